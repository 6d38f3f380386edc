"""Lesions of the held-out family: round or irregular, hypo- or hyperdense, 3-30 mm across."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .builder import Builder
from .plan import LesionRecord, Structure
from .shapes import Deformation, Metaballs, StarBlob

DIAMETER_RANGE_MM = (3.0, 30.0)
# region -> (hypodense contrast range, hyperdense contrast range), HU relative to the organ
CONTRAST_HU = {"abdomen": ((-60.0, -15.0), (20.0, 60.0)), "head_neck": ((-30.0, -12.0), (15.0, 40.0))}
LUNG_NODULE_HU = (-20.0, 60.0)  # absolute HU of a soft-tissue nodule in the lung


def _directions() -> np.ndarray:
    d = np.array([[x, y, z] for x in (-1, 0, 1) for y in (-1, 0, 1) for z in (-1, 0, 1) if (x, y, z) != (0, 0, 0)],
                 dtype=np.float64)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def add_lesions(b: Builder, region: str, organs: tuple[str, ...], count: int, deformation: Deformation,
                within: Optional[tuple[np.ndarray, tuple[int, int, int]]] = None, attempts: int = 1000) -> list[LesionRecord]:
    """Append ``count`` lesion structures to ``b`` inside the plan's ``organs``; their records.

    Args:
        within: optional (ijk_to_ras, shape_kji): lesion centres must fall inside that grid,
            one radius from its faces (mapped back through the deformation approximately).

    Raises:
        ValueError: when a lesion finds no place after ``attempts`` tries.
    """
    hosts = [s for s in b.structures if s.label_name in organs and not s.is_lesion]
    if count and not hosts:
        raise ValueError(f"none of the lesion organs {organs} is in this phantom")
    records = []
    probes = _directions()
    largest_mm = DIAMETER_RANGE_MM[1]
    if within is not None:  # a lesion must fit inside the grid
        extent_mm = np.asarray(within[1], dtype=np.float64)[::-1] * np.linalg.norm(within[0][:3, :3], axis=0)
        largest_mm = float(np.clip(0.6 * extent_mm.min(), DIAMETER_RANGE_MM[0], DIAMETER_RANGE_MM[1]))
    for _ in range(count):
        diameter = float(np.exp(b.rng.uniform(np.log(DIAMETER_RANGE_MM[0]), np.log(largest_mm))))
        kind = "irregular" if b.rng.random() < 0.5 else "round"
        for attempt in range(attempts):
            if attempt and attempt % 250 == 0:  # no room this size: try smaller, down to 3 mm
                diameter = max(DIAMETER_RANGE_MM[0], 0.7 * diameter)
            radius = diameter / 2.0
            host = hosts[int(b.rng.integers(len(hosts)))]
            lo, hi = host.shape.bounds()
            if within is not None:  # only where the grid is (give or take the deformation)
                grid_lo, grid_hi = _grid_box(*within, deformation.max_displacement_mm)
                lo, hi = np.maximum(lo, grid_lo), np.minimum(hi, grid_hi)
                if np.any(lo >= hi):
                    continue
            centre = b.rng.uniform(lo, hi)
            if not host.shape.inside(centre[:, None].astype(np.float32))[0]:
                continue  # cheap test first
            if within is not None and not _inside_grid(centre, radius, deformation, *within):
                continue
            ring = centre + 0.9 * radius * probes
            top = _top_label_names(b.structures, np.vstack([centre, ring]))
            if top[0] == host.label_name and np.mean(top[1:] == host.label_name) >= 0.9:
                break  # the organ, as painted (later structures cover earlier ones), holds the lesion
        else:
            raise ValueError(f"no room for a lesion in {organs} (within the grid)")
        shape = _lesion_shape(b, centre, radius, kind)
        if host.label_name.startswith("lung"):
            hu, contrast = b.uniform(*LUNG_NODULE_HU), None
        else:
            hypo, hyper = CONTRAST_HU.get(region, CONTRAST_HU["abdomen"])
            contrast = b.uniform(*(hypo if b.rng.random() < 0.5 else hyper))
            hu = host.hu + contrast
        b.structures.append(Structure("lesion", shape, hu, 2.0, host_label_name=host.label_name))
        records.append(LesionRecord(host.label_name, tuple(float(c) for c in centre), radius,
                                    float(hu - host.hu if contrast is None else contrast), kind))
    return records


def _lesion_shape(b: Builder, centre: np.ndarray, radius: float, kind: str):
    if kind == "round":
        return StarBlob(centre, b.vary(np.full(3, radius), 0.1), b.rotation(np.pi))
    if b.rng.random() < 0.5:
        return StarBlob(centre, b.vary(np.full(3, radius), 0.15), b.rotation(np.pi), b.harmonics(5, 0.22, 4.0))
    offsets = b.rng.normal(0.0, 0.45 * radius, (4, 3))
    return Metaballs(centre + offsets, np.full(4, 0.55 * radius), np.ones(4), level=0.6)


def _top_label_names(structures: list[Structure], points: np.ndarray) -> np.ndarray:
    """The class name painted last at each (N, 3) point of the deformed space."""
    names = np.full(len(points), "", dtype=object)
    p = points.T.astype(np.float32)
    for s in structures:
        names[s.shape.inside(p)] = s.label_name
    return names


def _grid_box(ijk_to_ras: np.ndarray, shape_kji, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """RAS bounding box of a grid's voxel centres, widened by ``margin_mm``."""
    upper = np.asarray(shape_kji, dtype=np.float64)[::-1] - 1
    corners = np.array([[i, j, k, 1.0] for i in (0, upper[0]) for j in (0, upper[1]) for k in (0, upper[2])])
    ras = (corners @ np.asarray(ijk_to_ras).T)[:, :3]
    return ras.min(axis=0) - margin_mm, ras.max(axis=0) + margin_mm


def _inside_grid(centre: np.ndarray, radius: float, deformation: Deformation, ijk_to_ras: np.ndarray,
                 shape_kji) -> bool:
    physical = centre.astype(np.float32)
    for _ in range(3):  # fixed point of p + d(p) = centre
        physical = physical - (deformation.apply(physical[:, None])[:, 0] - centre.astype(np.float32))
    ijk = np.linalg.solve(ijk_to_ras, np.append(physical.astype(np.float64), 1.0))[:3]
    margin = radius / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    upper = np.asarray(shape_kji, dtype=np.float64)[::-1] - 1
    return bool(np.all(ijk >= margin) and np.all(ijk <= upper - margin))
