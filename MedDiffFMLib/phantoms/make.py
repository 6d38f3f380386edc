"""Entry point: :func:`make_phantom` and the default grid matrix."""

from __future__ import annotations

import dataclasses
import math
import operator

import numpy as np

from .. import anatomy
from .canvas import BODY, RESERVED, Canvas, Placement
from .head import build_head
from .lesions import insert_lesions
from .noise import add_ct_noise
from .params import (REGION_CENTRE_T, STREAM_ANATOMY, STREAM_TEXTURE, Variation, check_matrix, check_phase,
                     check_region, check_seed, check_shape, check_spacing, head_extent, region_params, rng,
                     trunk_extent)
from .render import render, sample_matrix, sampling_factors, to_voxels
from .tissues import tissue_hu
from .trunk import build_trunk
from .types import Phantom


def default_ijk_to_ras(shape_kji, spacing_kji) -> np.ndarray:
    """The phantoms' default voxel -> RAS matrix.

    Direction columns are RAS ``(-1, 0, 0)``, ``(0, -1, 0)``, ``(0, 0, 1)`` for ``i, j, k``
    (DICOM's identity LPS direction: ``i`` towards the patient's left, ``j`` posterior,
    ``k`` superior), scaled by the spacing; the origin puts the volume centre at RAS 0.

    Args:
        shape_kji: (k, j, i) voxel counts.
        spacing_kji: (k, j, i) voxel size in mm.

    Returns:
        (4, 4) float64 matrix.
    """
    shape = check_shape(shape_kji)
    sk, sj, si = check_spacing(spacing_kji)
    m = np.eye(4)
    m[:3, :3] = np.diag([-si, -sj, sk])
    centre_ijk = np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2])
    m[:3, 3] = -m[:3, :3] @ centre_ijk
    return m


def placement(region: str, p: dict, shape, spacing, matrix: np.ndarray, fov_fill: float | None) -> Placement:
    """Where the body sits in RAS.

    With ``fov_fill`` the body is scaled so that it spans that fraction of the grid's in-plane
    field of view and centred on the grid (a miniature body on a small grid). Without it the
    body has its seed-drawn adult size (``p["unit_mm"]``) and the region's centre sits at
    RAS (0, 0, 0): the grid shows whatever part of the body it covers.
    """
    lat, ap_half, ap_centre = head_extent(p) if region == "head_neck" else trunk_extent(p)
    offset = (p["shift_u"], ap_centre + p["shift_v"], REGION_CENTRE_T[region] + p["t_shift"])
    if fov_fill is None:
        return Placement((0.0, 0.0, 0.0), p["unit_mm"], p["angle"], offset)
    unit = float(fov_fill) * min(shape[2] * spacing[2] / 2 / lat, shape[1] * spacing[1] / 2 / ap_half)
    centre_ijk = np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2, 1.0])
    return Placement(tuple(float(v) for v in (matrix @ centre_ijk)[:3]), unit, p["angle"], offset)


def make_phantom(region: str, shape_kji=(64, 64, 64), spacing_kji=(1.0, 1.0, 1.0), seed: int = 0, *,
                 lesions: int = 0, noise_hu: float = 12.0, ijk_to_ras: np.ndarray | None = None,
                 fov_fill: float | None = 0.85, phase: str | None = None, variation: Variation | None = None,
                 noise_correlation_mm: float | None = None, lesion_kwargs: dict | None = None) -> Phantom:
    """Generate a synthetic CT phantom by sampling the seed's body on a grid.

    Args:
        region: "head_neck", "chest" or "abdomen".
        shape_kji: (k, j, i) voxel counts, any positive sizes.
        spacing_kji: (k, j, i) voxel size in mm.
        seed: non-negative int; the same arguments give bit-identical output.
        lesions: number of lesions to insert (see :func:`insert_lesions`).
        noise_hu: CT noise standard deviation in HU (0 = clean).
        ijk_to_ras: optional (4, 4) matrix (column norms must equal the spacing; any
            orientation); default :func:`default_ijk_to_ras`. The body lives in RAS and the
            grid samples it, so an oblique matrix shows the body obliquely.
        fov_fill: fraction of the in-plane field of view the body spans (0 < fov_fill <= 1),
            centred on the grid; None gives an adult-sized body around RAS 0 (see
            :func:`placement`).
        phase: contrast phase ("native", "arterial", "portal_venous"); None draws it from the
            seed (native when ``variation.contrast_phase`` is off).
        variation: which variations the seed draws (:class:`Variation`); default all.
        noise_correlation_mm: noise correlation sigma in mm; default 0.7 x the in-plane spacing.
        lesion_kwargs: extra keyword arguments for :func:`insert_lesions`.

    Returns:
        A :class:`Phantom`. ``labels`` is uint8 (TotalSegmentator v2 values + 255 body),
        ``hu``/``clean_hu`` float32 HU.

    Raises:
        ValueError: unknown region or phase, shape not three positive ints, non-positive
            spacing, a matrix that does not match the spacing, or another bad argument.
    """
    region = check_region(region)
    shape = check_shape(shape_kji)
    spacing = check_spacing(spacing_kji)
    seed = check_seed(seed)
    phase = check_phase(phase)
    if fov_fill is not None and not (0 < float(fov_fill) <= 1):
        raise ValueError(f"fov_fill must be in (0, 1], got {fov_fill}")
    if not (math.isfinite(noise_hu) and noise_hu >= 0):
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
    lesions = operator.index(lesions)
    if lesions < 0:
        raise ValueError(f"lesions must be >= 0, got {lesions}")
    var = Variation() if variation is None else variation
    if not isinstance(var, Variation):
        raise ValueError(f"variation must be a Variation, got {type(var).__name__}")
    matrix = default_ijk_to_ras(shape, spacing) if ijk_to_ras is None else check_matrix(ijk_to_ras, spacing)

    p = region_params(region, seed, var)
    if phase is not None:
        p["phase"] = phase
    factors = sampling_factors(spacing, var)
    sample_shape = tuple(n * f for n, f in zip(shape, factors))
    deform = p["deform"] if var.deformation else (0.0, 0.0)
    cv = Canvas(sample_matrix(matrix, factors), sample_shape, placement(region, p, shape, spacing, matrix, fov_fill),
                deform, seed=seed, stream=STREAM_ANATOMY, pattern_seed=seed if var.organs else 0)
    (build_head if region == "head_neck" else build_trunk)(cv, p)
    cv.labels[cv.labels == RESERVED] = BODY
    hu_s = render(cv, p, var, tissue_hu(p), rng(seed, STREAM_TEXTURE))
    clean, labels = to_voxels(hu_s, cv.labels, factors, var)
    del cv, hu_s
    present = np.unique(labels)
    label_names = {int(v): anatomy.DEFAULT_LABEL_NAMES[int(v)] for v in present if v != 0}
    phantom = Phantom(hu=clean, labels=labels, label_names=label_names, lesion_mask=np.zeros(shape, bool),
                      ijk_to_ras=matrix, region=region, clean_hu=clean, phase=p["phase"])
    if lesions:
        phantom = insert_lesions(phantom, lesions, seed, **(lesion_kwargs or {}))
    corr = 0.7 * min(spacing[1], spacing[2]) if noise_correlation_mm is None else float(noise_correlation_mm)
    noisy = add_ct_noise(phantom.clean_hu, noise_hu, seed, spacing, corr)
    return dataclasses.replace(phantom, hu=noisy)
