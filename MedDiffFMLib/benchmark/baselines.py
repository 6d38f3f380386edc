"""Classical methods the model is measured against, and the masks the sections build.

Image baselines work on the window-clipped image (what the model sees) and keep the voxels
the window clips, as the model's tasks do. Sizes are in mm so that they mean the same on
every grid; ``spacing_kji`` is the grid's voxel size (k, j, i) in mm.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from .. import anatomy, metrics, preprocessing
from .options import GAUSSIAN_SIGMAS_MM, MIN_GROUP_FRACTION, NLM_H_FACTOR, NLM_PATCH_DISTANCE, NLM_PATCH_SIZE


def window_clip(hu: np.ndarray, region: str) -> np.ndarray:
    lo, hi = preprocessing.window_bounds(region)
    return np.clip(np.asarray(hu, dtype=np.float32), lo, hi)


def _windowed_filter(noisy: np.ndarray, region: str, fn) -> np.ndarray:
    noisy = np.asarray(noisy, dtype=np.float32)
    out = np.asarray(fn(window_clip(noisy, region)), dtype=np.float32)
    return np.where(preprocessing.outside_window(noisy, region), noisy, out).astype(np.float32)


# ------------------------------------------------------------------------------ denoising
def gaussian_denoise(noisy: np.ndarray, region: str, sigma_mm: float, spacing_kji: Sequence[float]) -> np.ndarray:
    """Gaussian filter of ``sigma_mm`` (per axis ``sigma_mm / spacing`` voxels)."""
    sigmas = [float(sigma_mm) / float(s) for s in spacing_kji]
    return _windowed_filter(noisy, region, lambda x: ndimage.gaussian_filter(x, sigmas, mode="nearest"))


def tune_gaussian_sigma(noisy: np.ndarray, clean: np.ndarray, region: str, spacing_kji, mask: np.ndarray,
                        sigmas_mm: Sequence[float] = GAUSSIAN_SIGMAS_MM) -> tuple[float, float]:
    """The sigma (mm) of ``sigmas_mm`` with the best windowed PSNR on a tuning pair: (sigma, PSNR).
    Ties go to the smaller sigma."""
    window = preprocessing.window_bounds(region)
    best: Optional[tuple[float, float]] = None
    for s in sigmas_mm:
        p = metrics.windowed_psnr(gaussian_denoise(noisy, region, s, spacing_kji), clean, window, mask)
        if best is None or p > best[1]:
            best = (float(s), p)
    assert best is not None
    return best


def estimate_noise_sigma(hu: np.ndarray) -> float:
    """Blind noise standard deviation in HU (Donoho and Johnstone): the median absolute value of
    the finest 3-D Haar detail band (high-pass along every axis, orthonormal) over 0.6745.

    For white noise of standard deviation s the band holds N(0, s^2) values; structure barely
    reaches it. Noise correlated between neighbours (as CT noise is) is underestimated, which
    is what a blind method faces."""
    x = np.asarray(hu, dtype=np.float64)
    n = [s // 2 * 2 for s in x.shape]
    if min(n) < 2:
        raise ValueError(f"the image {x.shape} is too thin to estimate its noise (2 voxels per axis needed)")
    x = x[: n[0], : n[1], : n[2]]
    detail = x[0::2] - x[1::2]
    detail = detail[:, 0::2] - detail[:, 1::2]
    detail = (detail[:, :, 0::2] - detail[:, :, 1::2]) / np.sqrt(8.0)
    return float(np.median(np.abs(detail)) / 0.6745)


def nlm_denoise(noisy: np.ndarray, region: str, sigma_hu: float) -> np.ndarray:
    """3-D non-local means (scikit-image, fast mode), noise ``sigma_hu`` given, h = 0.8 sigma."""
    from skimage.restoration import denoise_nl_means

    s = max(float(sigma_hu), 1e-6)
    return _windowed_filter(noisy, region, lambda x: denoise_nl_means(
        x, patch_size=NLM_PATCH_SIZE, patch_distance=NLM_PATCH_DISTANCE, h=NLM_H_FACTOR * s, sigma=s,
        fast_mode=True, preserve_range=True, channel_axis=None))


def bm4d_version() -> Optional[str]:
    """The installed ``bm4d`` version, or None."""
    try:
        import bm4d  # noqa: F401
        from importlib.metadata import version

        return version("bm4d")
    except Exception:  # absent, or its binary library does not load on this platform
        return None


def bm4d_denoise(noisy: np.ndarray, region: str, sigma_hu: float) -> np.ndarray:
    """BM4D (optional ``bm4d`` package, white-noise profile)."""
    import bm4d

    s = max(float(sigma_hu), 1e-6)
    return _windowed_filter(noisy, region, lambda x: bm4d.bm4d(x.astype(np.float64), s))


# ------------------------------------------------------------------------------ super-resolution
def interpolate(thick: np.ndarray, thick_ijk_to_ras, thin_shape, thin_ijk_to_ras, order: int) -> np.ndarray:
    """Linear (order 1) or cubic (order 3) interpolation of the thick slices onto the thin grid."""
    return preprocessing.resample_to_grid(thick, thick_ijk_to_ras, thin_shape, thin_ijk_to_ras, order=order)


def parabolic_slabs(thick: np.ndarray, factor: int) -> np.ndarray:
    """The piecewise-parabolic slab reconstruction (:func:`conditions.slab_parabolic`) of thick
    slices (n, H, W) onto the grid that subdivides each slab into ``factor`` slices, float32 HU."""
    import torch

    from ..conditions import slab_parabolic

    return slab_parabolic(torch.from_numpy(np.asarray(thick, dtype=np.float64)), factor).float().numpy()


def tv_slabs(thick: np.ndarray, factor: int, thin_spacing_kji) -> np.ndarray:
    """The total-variation slab reconstruction (:func:`slab_tv.slab_tv`) of thick slices (n, H, W)
    onto the grid that subdivides each slab into ``factor`` slices of ``thin_spacing_kji`` (mm), float32 HU."""
    import torch

    from ..slab_tv import slab_tv

    return slab_tv(torch.from_numpy(np.asarray(thick, dtype=np.float64)), factor, thin_spacing_kji).float().numpy()


# ------------------------------------------------------------------------------ anomaly detection
def organ_deviation_map(hu: np.ndarray, labels: np.ndarray, region: str, smoothing_mm: float,
                        spacing_kji) -> np.ndarray:
    """|u - median of u over the voxel's label| in window units ([-1, 1]), Gaussian-smoothed by
    ``smoothing_mm``, zero outside the body (labels > 0)."""
    from ..tasks.anomaly import organ_deviation

    labels = np.asarray(labels)
    return organ_deviation(preprocessing.hu_to_unit(hu, region), labels, labels > 0, smoothing_mm, spacing_kji)


def zscore_by_tissue(amap: np.ndarray, labels: np.ndarray, label_names) -> np.ndarray:
    """Robust z-score (median, 1.4826 MAD) of the map within each anatomy group inside the
    body, floored at 0: each tissue's own spread sets its scale."""
    from ..tasks.anomaly import group_zscore  # the model's own rule, so both maps are scored alike

    groups, _ = anatomy.group_map(labels, label_names)
    return group_zscore(amap, groups, np.asarray(labels) > 0)


# ------------------------------------------------------------------------------ synthesis
def main_groups(groups: np.ndarray, body: np.ndarray, min_fraction: float = MIN_GROUP_FRACTION) -> list[int]:
    """Group values (1 body tissue, 2 + g organ group g) covering >= ``min_fraction`` of the body and 10 voxels."""
    n_body = int(body.sum())
    out = []
    for v in np.unique(groups[body]):
        n = int(((groups == v) & body).sum())
        if v >= 1 and n >= max(10, min_fraction * n_body):
            out.append(int(v))
    return out


def group_name(value: int) -> str:
    return "body tissue" if value == 1 else anatomy.GROUP_NAMES[value - 2]


def class_means(hu: np.ndarray, groups: np.ndarray, body: np.ndarray, region: str,
                classes: Sequence[int]) -> dict[int, float]:
    """Mean window-clipped HU of each class inside the body."""
    c = window_clip(hu, region)
    return {int(v): float(c[(groups == v) & body].mean()) for v in classes if ((groups == v) & body).any()}


def nearest_mean_segmentation(hu: np.ndarray, means: dict[int, float], body: np.ndarray, region: str) -> np.ndarray:
    """Each body voxel gets the class whose mean (clipped HU) is nearest its own (ties: the first)."""
    keys = np.array(list(means), dtype=np.int16)
    centres = np.array([means[int(k)] for k in keys], dtype=np.float64)
    c = window_clip(hu, region).astype(np.float64)
    idx = np.argmin(np.abs(c[..., None] - centres), axis=-1)
    return np.where(body, keys[idx], 0).astype(np.int16)


# ------------------------------------------------------------------------------ local masks
def organ_ellipsoid_mask(labels: np.ndarray, spacing_kji, candidates: Sequence[int], radius_mm: float,
                         semi_scale: Sequence[float] = (1.0, 0.8, 1.2)) -> tuple[np.ndarray, int]:
    """An ellipsoid deep inside one of the ``candidates`` labels (the one with the deepest voxel),
    clipped to that organ. Semi-axes (k, j, i) are ``semi_scale`` times ``min(radius_mm,
    0.7 depth)`` in mm. Returns (mask, organ label); ValueError when no candidate is present."""
    spacing = np.asarray(spacing_kji, dtype=np.float64)
    best = None
    for label in candidates:
        organ = labels == label
        if not organ.any():
            continue
        depth = ndimage.distance_transform_edt(organ, sampling=spacing)
        centre = np.unravel_index(int(np.argmax(depth)), depth.shape)
        if best is None or depth[centre] > best[2]:
            best = (int(label), centre, float(depth[centre]), organ)
    if best is None:
        raise ValueError("none of the candidate organs is present")
    label, centre, depth_mm, organ = best
    r = max(min(float(radius_mm), 0.7 * depth_mm), float(spacing.max()))
    grids = np.ogrid[tuple(slice(0, n) for n in labels.shape)]
    q = sum(((g - c) * s / (r * f)) ** 2 for g, c, s, f in zip(grids, centre, spacing, semi_scale))
    mask = (q <= 1.0) & organ
    mask[centre] = True
    return mask, label


def organ_ring(mask: np.ndarray, organ: np.ndarray, spacing_kji, width_mm: float) -> np.ndarray:
    """Organ voxels outside ``mask`` within ``width_mm`` of it."""
    return organ & ~mask & near_mask(mask, spacing_kji, width_mm)


def near_mask(mask: np.ndarray, spacing_kji, width_mm: float) -> np.ndarray:
    return ndimage.distance_transform_edt(~mask, sampling=np.asarray(spacing_kji, dtype=np.float64)) <= width_mm


def equivalent_radius_mm(mask: np.ndarray, voxel_ml: float) -> float:
    """Radius of the sphere with the mask's volume, mm."""
    return float((3.0 * mask.sum() * voxel_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0))
