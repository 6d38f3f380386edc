"""CT intensity windows, resampling, body mask and a body-region guess.

Resampling uses ``scipy.ndimage.map_coordinates`` (order 0 nearest for labels and masks,
1 linear, 3 cubic B-spline with prefilter), evaluated one output slice at a time so memory
stays at the size of the input plus the output.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .geometry import regrid, spacing_kji, validate_ijk_to_ras

# (width, level) in HU.
REGION_WINDOWS: dict[str, tuple[float, float]] = {
    "head_neck": (400.0, 50.0),
    "chest": (1800.0, -500.0),
    "abdomen": (360.0, 60.0),
}
REGIONS = tuple(REGION_WINDOWS)
_ALIASES = {
    "head_neck": "head_neck", "head_and_neck": "head_neck", "headneck": "head_neck", "hn": "head_neck",
    "chest": "chest", "abdomen": "abdomen",
}

AIR_HU = -1024.0
"""Default fill for image voxels outside the source grid."""


def check_region(region: str) -> str:
    """The canonical region name; accepts aliases ("head-and-neck", "headneck", "hn").

    Raises ValueError listing the valid names otherwise.
    """
    key = str(region).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in _ALIASES:
        raise ValueError(
            f"unknown region {region!r}; valid regions: {', '.join(REGIONS)} "
            "(aliases: head-and-neck, headneck, hn); use guess_region() for 'auto'"
        )
    return _ALIASES[key]


def window_bounds(region: str) -> tuple[float, float]:
    """(lowest, highest) HU of the region's window: level -/+ width / 2."""
    width, level = REGION_WINDOWS[check_region(region)]
    return level - width / 2.0, level + width / 2.0


def hu_per_unit(region: str) -> float:
    """HU per window unit: half the window's width (the window spans 2 units)."""
    lo, hi = window_bounds(region)
    return (hi - lo) / 2.0


def hu_to_unit(hu, region: str) -> np.ndarray:
    """Window then scale to [-1, 1] (float32): ``lo -> -1``, ``hi -> 1``, clipped outside.

    Computed in float64 and rounded once to float32.
    """
    lo, hi = window_bounds(region)
    x = np.clip(np.asarray(hu, dtype=np.float64), lo, hi)
    return ((x - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)


def unit_to_hu(x, region: str) -> np.ndarray:
    """Inverse of :func:`hu_to_unit` (float32 HU); values outside [-1, 1] are clipped.

    For HU inside the window the round trip is exact up to the float32 rounding of the unit
    value and of the result: ``|unit_to_hu(hu_to_unit(h)) - h| <= 2**-24 * (|h - level| + |h|)``
    (at most ~1e-4 HU). A float32 -> float32 round trip cannot be bit-identical for every
    float32 HU (there are more float32 values near 0 HU than near the matching unit value),
    but integer HU (CT as stored) come back bit-identically after ``np.rint``, and the
    window's ends and level map exactly to -1, 1 and 0 and back.
    """
    lo, hi = window_bounds(region)
    u = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    return ((u + 1.0) * ((hi - lo) / 2.0) + lo).astype(np.float32)


def outside_window(hu, region: str) -> np.ndarray:
    """Bool mask of voxels the window clips (strictly below ``lo`` or above ``hi``)."""
    lo, hi = window_bounds(region)
    h = np.asarray(hu)
    return (h < lo) | (h > hi)


# --------------------------------------------------------------------------- resampling


def _check_array(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D (k, j, i) array, got shape {a.shape}")
    return a


def _resample(
    array: np.ndarray,
    src: np.ndarray,
    dst_shape: tuple[int, int, int],
    dst: np.ndarray,
    order: int,
    fill: float | None,
    clamp: bool,
) -> np.ndarray:
    if order not in (0, 1, 3):
        raise ValueError(f"order must be 0 (nearest), 1 (linear) or 3 (cubic), got {order!r}")
    a = _check_array(array)
    dst_shape = tuple(int(s) for s in dst_shape)
    if len(dst_shape) != 3 or min(dst_shape) < 1:
        raise ValueError(f"destination shape must be 3 positive integers, got {dst_shape}")
    src = validate_ijk_to_ras(src)
    dst = validate_ijk_to_ras(dst)
    if fill is None:
        fill = 0 if order == 0 else AIR_HU

    # index mapping dst (i, j, k) -> src (i, j, k), then in array order (k, j, i)
    m = np.linalg.inv(src) @ dst
    rev = [2, 1, 0]
    lin = m[:3, :3][np.ix_(rev, rev)]
    off = m[:3, 3][rev]

    if order == 0:
        out_dtype = a.dtype
        work = a.view(np.uint8) if a.dtype == bool else a
    else:
        out_dtype = np.dtype(np.float32)
        work = a.astype(np.float32, copy=False)
    if order > 1:
        work = ndimage.spline_filter(work, order=order, output=np.float32, mode="mirror")
    out = np.empty(dst_shape, dtype=work.dtype if order == 0 else np.float32)

    n = np.asarray(a.shape, dtype=np.float64)
    jj, ii = np.meshgrid(np.arange(dst_shape[1]), np.arange(dst_shape[2]), indexing="ij")
    base = lin[:, 1, None, None] * jj + lin[:, 2, None, None] * ii + off[:, None, None]
    eps = 1e-6
    for k in range(dst_shape[0]):
        coords = base + lin[:, 0, None, None] * k  # (3, J, I) source (k, j, i)
        # between the outermost voxel centres and the voxel-corner box: the edge value
        clipped = np.clip(coords, 0.0, (n - 1.0)[:, None, None])
        vals = ndimage.map_coordinates(
            work, clipped, order=order, mode="mirror", prefilter=False, output=out.dtype
        )
        if not clamp:
            inside = np.all((coords >= -0.5 - eps) & (coords <= n[:, None, None] - 0.5 + eps), axis=0)
            vals[~inside] = fill
        out[k] = vals
    if order == 0 and a.dtype == bool:
        return out.astype(bool)
    return out.astype(out_dtype, copy=False)


def resample_to_grid(
    array: np.ndarray,
    src_ijk_to_ras,
    dst_shape_kji,
    dst_ijk_to_ras,
    order: int = 1,
    fill: float | None = None,
) -> np.ndarray:
    """Resample ``array`` onto any target grid (oblique, other direction, other spacing).

    Each target voxel centre is mapped into the source grid and interpolated there. Target
    voxels whose centre falls outside the source's voxel-corner box get ``fill`` (default:
    0 for ``order=0``, :data:`AIR_HU` otherwise); inside the box, samples beyond the outermost
    voxel centres take the edge value. ``order`` 0 keeps the input dtype (labels, masks);
    1 and 3 return float32. When shapes match and the matrices are equal (to 1e-9), the
    input array itself is returned unchanged (no copy).
    """
    a = _check_array(array)
    src = np.asarray(src_ijk_to_ras, dtype=np.float64)
    dst = np.asarray(dst_ijk_to_ras, dtype=np.float64)
    if tuple(int(s) for s in dst_shape_kji) == a.shape and src.shape == dst.shape == (4, 4) and np.allclose(
        src, dst, rtol=0.0, atol=1e-9
    ):
        return a
    return _resample(a, src, tuple(dst_shape_kji), dst, order, fill, clamp=False)


def resample(array: np.ndarray, ijk_to_ras, new_spacing_kji, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Resample onto :func:`geometry.regrid`'s grid (same extent and direction, new spacing).

    Samples beyond the outermost source voxel centres take the edge value (no fill), since the
    new grid covers the same box (up to the rounding of the voxel count). Returns
    ``(array, new_ijk_to_ras)``; when the spacing is already the requested one the input
    array itself comes back (no copy). ``order`` 0 keeps the dtype, 1 and 3 give float32.
    """
    a = _check_array(array)
    src = validate_ijk_to_ras(ijk_to_ras)
    dst, shape = regrid(src, a.shape, new_spacing_kji)
    if shape == a.shape and np.allclose(src, dst, rtol=0.0, atol=1e-9):
        return a, src.copy()
    return _resample(a, src, shape, dst, order, None, clamp=True), dst


# --------------------------------------------------------------------------- body and region


def estimate_body_mask(hu: np.ndarray, threshold_hu: float = -500.0) -> np.ndarray:
    """Bool body mask: ``hu > threshold``, largest 3-D connected component, holes filled.

    Holes are filled in 3-D and then slice by slice along k (so the lungs, which reach the
    outside through the airway in 3-D, are filled in each axial slice).
    """
    h = _check_array(hu)
    fg = h > threshold_hu
    lab, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(h.shape, dtype=bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    body = lab == int(np.argmax(sizes))
    del lab
    body = ndimage.binary_fill_holes(body)
    for k in range(body.shape[0]):
        body[k] = ndimage.binary_fill_holes(body[k])
    return body


def guess_region(hu: np.ndarray, ijk_to_ras) -> str:
    """Heuristic body-region guess ("auto"): "chest", "head_neck" or "abdomen".

    A heuristic, not a classifier; callers should let users override it. On a copy
    subsampled to about 3 mm voxels:

    1. chest if more than 15% of the body (holes filled) is lung-like (-950..-600 HU);
    2. head_neck if the mean axial body cross-section is under 250 cm² and more than 5% of a
       15 mm band inside the skin is bone-like (> 300 HU, the skull or mandible ring);
    3. abdomen otherwise (also when no body is found).

    "Axial" slices are those across the array axis closest to the S direction.
    """
    h = _check_array(hu)
    m = validate_ijk_to_ras(ijk_to_ras)
    sp = spacing_kji(m)
    step = np.maximum(1, np.floor(3.0 / sp)).astype(int)
    h = h[:: step[0], :: step[1], :: step[2]]
    sp = sp * step
    # put the axis closest to superior first
    d = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    si_axis = 2 - int(np.argmax(np.abs(d[2])))  # matrix column c -> array axis 2 - c
    h = np.moveaxis(h, si_axis, 0)
    sp = np.concatenate([[sp[si_axis]], np.delete(sp, si_axis)])

    body = estimate_body_mask(h)
    n_body = int(body.sum())
    if n_body == 0:
        return "abdomen"
    lung = (h >= -950.0) & (h <= -600.0) & body
    if lung.sum() / n_body > 0.15:
        return "chest"

    per_slice = body.sum(axis=(1, 2))
    occupied = per_slice > 0
    mean_area_cm2 = float(per_slice[occupied].mean() * sp[1] * sp[2] / 100.0)
    iters = max(1, int(round(15.0 / float(min(sp[1], sp[2])))))
    inner = ndimage.binary_erosion(
        body, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], dtype=bool), iterations=iters
    )
    band = body & ~inner
    n_band = int(band.sum())
    bone_fraction = float(((h > 300.0) & band).sum() / n_band) if n_band else 0.0
    if mean_area_cm2 < 250.0 and bone_fraction > 0.05:
        return "head_neck"
    return "abdomen"
