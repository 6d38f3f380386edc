"""Render a :class:`PhantomPlan` on any grid, with a slab slice profile.

Each voxel is the mean of the continuous phantom over sub-samples spread evenly through the
voxel: along k (the slice axis) ``samples_k`` points cover the slice thickness, so a thick
slice is the average of the thin ones it contains (a box slice profile), and edges get
partial-volume values; in-plane one sample per voxel unless asked (clinical in-plane voxels
are finer than the structures). Labels and the lesion mask are those of the voxel centre.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..geometry import spacing_kji as grid_spacing_kji
from ..geometry import validate_ijk_to_ras
from ..volume import Volume
from .plan import AIR_HU, PhantomPlan
from .texture import texture_on_grid

SUBSAMPLE_MM = 0.6  # sub-sample distance along k for the automatic slab profile
POINTS_PER_CHUNK = 1 << 22  # sub-sample points evaluated at a time (bounds memory)


@dataclass
class RenderedPhantom:
    """A plan on one grid.

    Attributes:
        clean_hu: (k, j, i) float32 noise-free HU (the truth).
        labels: (k, j, i) uint8: TotalSegmentator v2 values, 255 body, 0 air.
        label_names: value -> class name for the values present (0 excluded).
        lesion_mask: (k, j, i) bool, True where the voxel centre is in a lesion.
        ijk_to_ras: (4, 4) float64, the grid.
        region: the plan's region.
        plan: the plan rendered.
    """

    clean_hu: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    lesion_mask: np.ndarray
    ijk_to_ras: np.ndarray
    region: str
    plan: PhantomPlan

    def volume(self) -> Volume:
        return Volume(self.clean_hu, self.ijk_to_ras)

    def label_volume(self) -> Volume:
        return Volume(self.labels, self.ijk_to_ras)


def samples_for_spacing(spacing_kji: Sequence[float]) -> tuple[int, int, int]:
    """Automatic sub-samples per axis (k, j, i): odd, about one per 0.6 mm along k, one in-plane."""
    n_k = max(1, int(np.ceil(float(spacing_kji[0]) / SUBSAMPLE_MM)))
    return (n_k + (1 - n_k % 2), 1, 1)


def subsample_offsets(samples_kji: Sequence[int]) -> np.ndarray:
    """(S, 3) offsets in index units (i, j, k): the midpoints of ``n`` equal parts of [-0.5, 0.5]
    per axis, all combinations; symmetric about 0, the centre included for odd counts.
    Row ``S // 2`` is the centre when every count is odd."""
    per_axis = [((np.arange(n) + 0.5) / n - 0.5) for n in (int(s) for s in samples_kji)]
    dk, dj, di = np.meshgrid(*per_axis, indexing="ij")
    return np.column_stack([di.ravel(), dj.ravel(), dk.ravel()])


def _tables(plan: PhantomPlan):
    from .plan import label_value

    structures = plan.structures
    label = np.array([0] + [s.label for s in structures], dtype=np.int32)
    hu = np.array([AIR_HU] + [s.hu for s in structures], dtype=np.float32)
    texture_hu = np.array([0.0] + [s.texture_hu for s in structures], dtype=np.float32)
    lesion = np.array([False] + [s.is_lesion for s in structures])
    over = [None] + [np.array([label_value(n) for n in ((s.host_label_name,) if s.is_lesion else s.over_labels)])
                     for s in structures]
    return label, hu, texture_hu, lesion, over


def paint(plan: PhantomPlan, deformed_points: np.ndarray, index_ranges=None) -> np.ndarray:
    """Structure index (0 = air, n = ``plan.structures[n - 1]``) at each point, painter's order.

    Args:
        deformed_points: (3, ...) points (x, y, z first) already mapped by ``plan.deformation``.
        index_ranges: optional callable ``structure number (0-based) -> index`` into the axes
            after the first of ``deformed_points`` where the structure can be (slices or a
            boolean mask), or None where it cannot (default: everywhere).

    Returns:
        int16 array of shape ``deformed_points.shape[1:]``.
    """
    label, _, _, _, over = _tables(plan)
    painted = np.zeros(deformed_points.shape[1:], dtype=np.int16)
    for n, structure in enumerate(plan.structures, start=1):
        where = index_ranges(n - 1) if index_ranges is not None else (Ellipsis,)
        if where is None:
            continue
        block = deformed_points[(slice(None),) + tuple(where)]
        if block.size == 0:
            continue
        inside = structure.shape.inside(block)
        sub = painted[where]
        if len(over[n]):
            inside &= np.isin(label[sub], over[n])
        if structure.container:
            inside &= sub >= structure.container
        sub[inside] = n
        if any(isinstance(w, np.ndarray) for w in where):
            painted[where] = sub  # a mask index gives a copy, slices a view
    return painted


def evaluate_points(plan: PhantomPlan, points_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The piecewise-constant phantom (no texture) at (..., 3) RAS points: (HU, label) of shape (...)."""
    label, hu, _, _, _ = _tables(plan)
    points = np.moveaxis(np.asarray(points_ras, dtype=np.float32), -1, 0)
    painted = paint(plan, plan.deformation.apply(points))
    return hu[painted], label[painted]


def render_plan(plan: PhantomPlan, ijk_to_ras, shape_kji: Sequence[int],
                samples_kji: Optional[Sequence[int]] = None, texture: bool = True,
                refine_everywhere: bool = False) -> RenderedPhantom:
    """The plan on the grid ``ijk_to_ras`` (any direction, oblique allowed) of ``shape_kji`` voxels.

    Every voxel is the mean over its sub-samples. To keep this fast, the phantom is first
    painted at the voxel centres; voxels whose 26 neighbours all show the same structure, and
    that hold no lesion's bounding box, take the centre's value for all their sub-samples
    (a structure boundary through such a voxel would have to be thinner than a voxel and
    miss every neighbouring centre). ``refine_everywhere`` evaluates every sub-sample.

    Args:
        samples_kji: sub-samples per voxel along (k, j, i), odd; default
            :func:`samples_for_spacing` of the grid's spacing.
        texture: add the tissue texture (off: the piecewise-constant phantom only).
    """
    from scipy import ndimage

    matrix = validate_ijk_to_ras(ijk_to_ras)
    shape = tuple(int(s) for s in shape_kji)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape_kji must be three positive integers, got {shape_kji!r}")
    samples = tuple(int(s) for s in (samples_kji or samples_for_spacing(grid_spacing_kji(matrix))))
    if len(samples) != 3 or min(samples) < 1 or any(s % 2 == 0 for s in samples):
        raise ValueError(f"samples_kji must be three odd positive counts, got {samples_kji!r}")
    offsets = subsample_offsets(samples)
    label_table, hu_table, texture_table, lesion_table, _ = _tables(plan)
    inverse = np.linalg.inv(matrix)
    margin_mm = plan.deformation.max_displacement_mm + 1.0
    boxes = [_index_box(s.shape.bounds(), margin_mm, inverse, shape) for s in plan.structures]
    centre = _paint_centres(plan, matrix, shape, boxes)
    clean = hu_table[centre]
    amplitude = texture_table[centre]
    if len(offsets) > 1:
        refine = np.ones(shape, bool) if refine_everywhere else (
            ndimage.maximum_filter(centre, size=3) != ndimage.minimum_filter(centre, size=3))
        for structure, box in zip(plan.structures, boxes):
            if structure.is_lesion and box is not None:
                refine[tuple(slice(lo, hi) for lo, hi in box)] = True
        voxels = np.nonzero(refine)
        per_chunk = max(1, POINTS_PER_CHUNK // len(offsets))
        for start in range(0, len(voxels[0]), per_chunk):
            kk, jj, ii = (v[start:start + per_chunk] for v in voxels)
            deformed = plan.deformation.apply(_sample_points(matrix, offsets, kk, jj, ii))

            def where(n, kk=kk, jj=jj, ii=ii):
                box = boxes[n]
                if box is None:
                    return None
                (k0, k1), (j0, j1), (i0, i1) = box
                # voxels come sorted by k: the box's slices are one contiguous run of them
                first, last = np.searchsorted(kk, k0), np.searchsorted(kk, k1)
                if first >= last:
                    return None
                mask = np.zeros(len(kk), dtype=bool)
                j_run, i_run = jj[first:last], ii[first:last]
                mask[first:last] = (j_run >= j0) & (j_run < j1) & (i_run >= i0) & (i_run < i1)
                return (slice(None), mask) if mask.any() else None

            painted = paint(plan, deformed, where)
            clean[kk, jj, ii] = hu_table[painted].mean(axis=0)
            amplitude[kk, jj, ii] = texture_table[painted].mean(axis=0)
    clean = clean.astype(np.float32)
    if texture:
        clean += amplitude * texture_on_grid(plan.texture, matrix, shape, offsets)
    labels = label_table[centre].astype(np.uint8)
    return RenderedPhantom(clean, labels, _present_names(labels), lesion_table[centre], matrix.copy(),
                           plan.region, plan)


def _paint_centres(plan: PhantomPlan, matrix: np.ndarray, shape: tuple[int, int, int], boxes) -> np.ndarray:
    """Structure index at every voxel centre, (k, j, i) int16, slab by slab."""
    nk, nj, ni = shape
    out = np.empty(shape, np.int16)
    chunk = max(1, POINTS_PER_CHUNK // (nj * ni))
    centre = np.zeros((1, 3))
    for k0 in range(0, nk, chunk):
        k1 = min(nk, k0 + chunk)
        kk, jj, ii = (a.ravel() for a in np.meshgrid(np.arange(k0, k1), np.arange(nj), np.arange(ni), indexing="ij"))
        points = _sample_points(matrix, centre, kk, jj, ii).reshape(3, 1, k1 - k0, nj, ni)
        deformed = plan.deformation.apply(points)

        def where(n, k0=k0, k1=k1):
            box = boxes[n]
            if box is None:
                return None
            (b0, b1), (j0, j1), (i0, i1) = box
            b0, b1 = max(b0, k0), min(b1, k1)
            return None if b0 >= b1 else (slice(None), slice(b0 - k0, b1 - k0), slice(j0, j1), slice(i0, i1))

        out[k0:k1] = paint(plan, deformed, where)[0]
    return out


def _sample_points(matrix: np.ndarray, offsets: np.ndarray, kk: np.ndarray, jj: np.ndarray,
                   ii: np.ndarray) -> np.ndarray:
    """(3, S, n) float32 RAS positions (x, y, z first) of the sub-samples of voxels (kk, jj, ii)."""
    out = np.empty((3, len(offsets), len(kk)), dtype=np.float32)
    for axis in range(3):
        ci, cj, ck = matrix[axis, 0], matrix[axis, 1], matrix[axis, 2]
        centre = matrix[axis, 3] + ci * ii + cj * jj + ck * kk
        for s, (di, dj, dk) in enumerate(offsets):
            out[axis, s] = centre + (ci * di + cj * dj + ck * dk)
    return out


def _index_box(bounds, margin_mm: float, inverse: np.ndarray, shape: tuple[int, int, int]):
    """((k0, k1), (j0, j1), (i0, i1)) voxel ranges that can hold points of a RAS box, or None."""
    lo, hi = (np.asarray(b, dtype=np.float64) for b in bounds)
    lo, hi = lo - margin_mm, hi + margin_mm
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = (corners @ inverse.T)[:, :3]
    first = np.floor(ijk.min(axis=0)).astype(int) - 1
    last = np.ceil(ijk.max(axis=0)).astype(int) + 2
    ranges = [(max(int(first[axis]), 0), min(int(last[axis]), shape[2 - axis])) for axis in (2, 1, 0)]
    return None if any(a >= b for a, b in ranges) else tuple(ranges)


def _present_names(labels: np.ndarray) -> dict[int, str]:
    from .. import anatomy

    present = set(int(v) for v in np.unique(labels)) - {0}
    return {v: anatomy.DEFAULT_LABEL_NAMES[v] for v in sorted(present)}
