"""Grid geometry: the 4x4 ``ijk_to_ras`` matrix and what can be read from or done to it.

Convention (Slicer's): ``ras = ijk_to_ras @ (i, j, k, 1)``; the origin (last column) is the
centre of voxel (0, 0, 0); column ``c`` of the 3x3 part is the unit direction of index axis
``c`` (i, j, k) times the spacing along it in mm. Arrays are indexed (k, j, i), so every
per-axis tuple in the library (``spacing_kji``, ``shape_kji``) is in array-axis order, the
reverse of the matrix column order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

MIN_SPACING_MM = 1e-3
MAX_SPACING_MM = 1e3


def _as_matrix(ijk_to_ras) -> np.ndarray:
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"ijk_to_ras must be a 4x4 matrix, got shape {m.shape}")
    return m


def _as_triple(values, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 0:
        v = np.full(3, float(v))
    if v.shape != (3,):
        raise ValueError(f"{name} must have 3 values (k, j, i), got {np.asarray(values).tolist()!r}")
    return v


def spacing_kji(ijk_to_ras) -> np.ndarray:
    """Voxel size in mm along the array axes (k, j, i): norms of the columns, reversed."""
    m = _as_matrix(ijk_to_ras)
    return np.linalg.norm(m[:3, :3], axis=0)[::-1].copy()


def direction(ijk_to_ras) -> np.ndarray:
    """3x3 matrix whose columns are the unit RAS directions of the index axes i, j, k.

    Column order is the matrix's (i, j, k), not the array's (k, j, i).
    """
    m = _as_matrix(ijk_to_ras)
    norms = np.linalg.norm(m[:3, :3], axis=0)
    if np.any(~np.isfinite(norms)) or np.any(norms == 0):
        raise ValueError(f"ijk_to_ras has a zero or non-finite column; spacing {norms[::-1].tolist()} (k, j, i)")
    return m[:3, :3] / norms


def make_ijk_to_ras(
    spacing_kji: Sequence[float],
    origin_ras: Sequence[float] = (0.0, 0.0, 0.0),
    direction: np.ndarray | None = None,
) -> np.ndarray:
    """Build a 4x4 ``ijk_to_ras``.

    Args:
        spacing_kji: voxel size in mm along (k, j, i); a scalar means isotropic.
        origin_ras: RAS position (mm) of the centre of voxel (0, 0, 0).
        direction: 3x3 unit direction columns for (i, j, k); None means identity (i -> R,
            j -> A, k -> S).
    """
    sp = _as_triple(spacing_kji, "spacing_kji")
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    if d.shape != (3, 3):
        raise ValueError(f"direction must be 3x3, got shape {d.shape}")
    m = np.eye(4)
    m[:3, :3] = d * sp[::-1]  # scale column c (i, j, k) by the spacing along i, j, k
    m[:3, 3] = np.asarray(origin_ras, dtype=np.float64).reshape(3)
    return m


def regrid(
    ijk_to_ras, shape_kji: Sequence[int], new_spacing_kji: Sequence[float]
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A grid with a new spacing over the same physical extent and with the same direction.

    The extent along each axis is the voxel-corner extent ``shape * spacing``. The new number
    of voxels is ``round(extent / new_spacing)`` (halves round up, at least 1). The *first
    corner* (the outer corner of voxel (0, 0, 0)) is kept fixed, so the new origin (centre of
    the new voxel (0, 0, 0)) is ``old_origin + D @ ((new_spacing - old_spacing) / 2)`` per axis
    (D = unit direction columns). When the extent divides exactly this covers exactly the same
    box. When rounding changes the extent, the first corner still stays fixed and only the far
    corner moves (by less than half a new voxel: to ``first_corner + new_shape * new_spacing``).

    Example: 5 mm -> 1 mm along k gives 5x the slices; the first new slice centre lies 2 mm
    from the old first slice centre, toward the first corner (i.e. along ``-D[:, k]``); the
    new slices are centred on the old ones' sub-slabs.

    Returns:
        (new_ijk_to_ras, new_shape_kji)
    """
    m = _as_matrix(ijk_to_ras)
    shape = np.asarray(shape_kji, dtype=np.int64)
    if shape.shape != (3,) or np.any(shape < 1):
        raise ValueError(f"shape_kji must be 3 positive integers, got {shape_kji!r}")
    old_sp = spacing_kji(m)
    new_sp = _as_triple(new_spacing_kji, "new_spacing_kji")
    _check_spacing(new_sp, "new spacing")
    extent = shape * old_sp
    new_shape = np.maximum(1, np.floor(extent / new_sp + 0.5 + 1e-9)).astype(np.int64)
    d = direction(m)
    shift_ijk = ((new_sp - old_sp) / 2.0)[::-1]
    out = make_ijk_to_ras(new_sp, m[:3, 3] + d @ shift_ijk, d)
    return out, tuple(int(s) for s in new_shape)  # type: ignore[return-value]


def _check_spacing(sp: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(sp)):
        raise ValueError(f"{what} is not finite: {sp.tolist()} mm (k, j, i)")
    if np.any(sp < MIN_SPACING_MM) or np.any(sp > MAX_SPACING_MM):
        raise ValueError(
            f"absurd spacing: {what} {sp.tolist()} mm (k, j, i) is outside "
            f"[{MIN_SPACING_MM:g}, {MAX_SPACING_MM:g}] mm"
        )


def validate_ijk_to_ras(m) -> np.ndarray:
    """Check a 4x4 ``ijk_to_ras`` and return it as float64; ValueError with the reason if not.

    Checks: 4x4, all finite, last row (0, 0, 0, 1), spacing in [1e-3, 1e3] mm ("absurd
    spacing" otherwise), non-singular (the unit direction columns must not be (nearly)
    linearly dependent: |det| of the direction part > 1e-6).
    """
    a = _as_matrix(m)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"ijk_to_ras has non-finite entries (NaN or inf):\n{a}")
    if not np.array_equal(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"ijk_to_ras last row must be (0, 0, 0, 1), got {a[3].tolist()}")
    _check_spacing(spacing_kji(a), "spacing")
    if abs(np.linalg.det(direction(a))) < 1e-6:
        raise ValueError(f"ijk_to_ras is singular (index axes are not independent):\n{a}")
    return a


def voxel_to_ras(ijk_to_ras, ijk: np.ndarray) -> np.ndarray:
    """RAS positions (N, 3) of voxel indices given as (N, 3) in (i, j, k) order."""
    m = _as_matrix(ijk_to_ras)
    p = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
    return p @ m[:3, :3].T + m[:3, 3]
