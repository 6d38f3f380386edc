"""Image formation: tissues -> HU on the sample grid, then samples -> voxels.

A voxel's value is the mean of its sub-samples: ``fk`` points spread evenly through its slab
along k (the slice profile) and ``fj x fi`` through its in-plane footprint, followed by an
in-plane point-spread of half a pixel (the reconstruction kernel). Everything before the
averaging is a function of the sample grid alone, so a thick-slice phantom is exactly the
slab mean of the thin-slice phantom sampled at its sub-sample positions.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .canvas import Canvas
from .fields import grid_texture
from .params import Variation
from .tissues import T_LIVER, T_LUNG, T_PORTAL, T_SPLEEN, TEXTURE, arterial_hu

# Texture correlation lengths (frame units): about 12, 4 and 1.4 mm on an adult trunk.
TEXTURE_SCALES = (0.09, 0.03, 0.011)
PSF_SIGMA_PX = 0.5
SLAB_STEP_MM = 1.5  # a slab is sampled at least this finely along k
FOOTPRINT_FROM_MM = 3.0  # pixels coarser than this average 3 x 3 in-plane sub-samples


def sampling_factors(spacing_kji, var: Variation) -> tuple[int, int, int]:
    """Odd sub-sample counts (k, j, i) per voxel for the slab profile and partial volume."""
    sk, sj, si = spacing_kji
    fk = 1
    if var.slab_profile:
        fk = min(5, max(1, math.ceil(sk / SLAB_STEP_MM)))
        fk += 1 - fk % 2  # odd: the voxel centre is a sample (labels are taken there)
    fj = 3 if var.partial_volume and sj > FOOTPRINT_FROM_MM else 1
    fi = 3 if var.partial_volume and si > FOOTPRINT_FROM_MM else 1
    return fk, fj, fi


def sample_matrix(ijk_to_ras: np.ndarray, factors_kji) -> np.ndarray:
    """Sample-index -> RAS matrix for a voxel matrix refined by ``factors_kji``.

    Sample ``q`` along an axis with factor ``f`` sits at voxel coordinate ``(q + 0.5) / f - 0.5``.
    """
    f_ijk = np.array(factors_kji[::-1], float)
    s = np.eye(4)
    s[:3, :3] = np.diag(1.0 / f_ijk)
    s[:3, 3] = 0.5 / f_ijk - 0.5
    return np.asarray(ijk_to_ras, float) @ s


def render(cv: Canvas, p: dict, var: Variation, hu_table: np.ndarray, generator: np.random.Generator) -> np.ndarray:
    """Tissue map -> clean HU on the sample grid: mean values, texture, lung and liver vessels.

    Returns:
        float32 array of the canvas's shape.
    """
    tissue = cv.tissue
    hu = hu_table[tissue]
    if var.texture:
        for scale, (cell, gain) in enumerate(zip(TEXTURE_SCALES, p["texture_gain"])):
            amp = TEXTURE[:, scale] * np.float32(gain)
            if scale == 0 and p["phase"] == "arterial":
                amp[T_SPLEEN] += 25.0  # arciform enhancement: a mottled spleen
            sigma_vox = [cell * cv.unit / sp for sp in cv.spacing]
            hu += amp[tissue] * grid_texture(generator, cv.shape, sigma_vox)
    _add_vessel_trees(cv, p, hu_table, hu)
    return hu


def _add_vessel_trees(cv: Canvas, p: dict, hu_table: np.ndarray, hu: np.ndarray) -> None:
    """Lung and liver vessels: tubes where two anatomy fields are both near zero."""
    present = (cv.tissue == T_LUNG) | (cv.tissue == T_LIVER)
    if not present.any():
        return
    bounds = [np.flatnonzero(present.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]
    sl = tuple(slice(int(b[0]), int(b[-1]) + 1) for b in bounds)
    f1 = cv.field(0.06, sl)
    f2 = cv.field(0.06, sl)
    r2 = f1 * f1 + f2 * f2
    del f1, f2
    tis = cv.tissue[sl]
    U, V, T = cv.coords(sl)
    sub = hu[sl]
    lung = tis == T_LUNG
    if lung.any():
        # Vessels are thicker and denser near the hila (trunk frame, about carina level).
        hil = np.minimum(np.sqrt((np.abs(U) - 0.3) ** 2 + (V + 0.02) ** 2 + ((T - 1.3) / 1.5) ** 2), 3.0)
        width = np.clip(0.27 - 0.1 * hil, 0.1, 0.27)
        strength = np.clip(1.15 - 0.5 * hil, 0.35, 1.0)
        vessel_hu = arterial_hu(p) if p["phase"] != "native" else 40.0
        tube = np.exp(-r2 / (2 * width * width))
        sub += np.where(lung, (vessel_hu - hu_table[T_LUNG]) * tube * strength + 30.0 * np.clip(V, -0.6, 0.6), 0.0)
    liver = tis == T_LIVER
    if liver.any():
        vessel = {"native": 42.0, "arterial": hu_table[T_LIVER] - 8.0, "portal_venous": hu_table[T_PORTAL] + 10.0}
        delta = vessel[p["phase"]] - hu_table[T_LIVER]
        sub += np.where(liver, delta * np.exp(-r2 / (2 * 0.12 ** 2)), 0.0).astype(np.float32)


def to_voxels(hu_s: np.ndarray, labels_s: np.ndarray, factors_kji, var: Variation):
    """Sample grid -> voxel grid: block means of HU, labels at the voxel centres.

    Returns:
        ``(hu, labels)``: float32 and uint8 arrays of shape ``sample shape / factors``.
    """
    fk, fj, fi = factors_kji
    nk, nj, ni = (n // f for n, f in zip(hu_s.shape, factors_kji))
    hu = hu_s
    if (fk, fj, fi) != (1, 1, 1):
        hu = hu_s.reshape(nk, fk, nj, fj, ni, fi).mean(axis=(1, 3, 5), dtype=np.float32)
    labels = np.ascontiguousarray(labels_s[fk // 2::fk, fj // 2::fj, fi // 2::fi])
    if var.partial_volume:
        hu = ndimage.gaussian_filter(hu, (0.0, PSF_SIGMA_PX, PSF_SIGMA_PX), mode="nearest")
    return np.ascontiguousarray(hu, dtype=np.float32), labels
