"""Benchmark cases: a phantom of one family on a clinical grid (oblique, anisotropic).

Grids are drawn per case: in-plane 0.6-0.9 mm, slices 1-5 mm, the direction a DICOM-like
patient orientation tilted by 3-15 degrees, centred on the region's focus. No case is ever
built on a model's own grid; the model has to work at the voxel size a scanner gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..geometry import make_ijk_to_ras
from ..volume import Volume
from .options import (INPLANE_MM, MAX_TILT_DEG, REGIONS, SEEDS_PER_CASE, SLICE_MM, SUPERRES_THIN_MM,
                      TUNING_SEED_OFFSET)


@dataclass
class Case:
    """One noise-free phantom on one grid.

    Attributes:
        name: e.g. "heldout abdomen 200020" (family, region, seed).
        family: "heldout" or "training".
        region: "head_neck", "chest" or "abdomen".
        clean_hu: (k, j, i) float32 truth, HU.
        labels: (k, j, i) uint8 TotalSegmentator v2 values, 255 body, 0 air.
        label_names: value -> class name.
        lesion_mask: (k, j, i) bool.
        ijk_to_ras: (4, 4) grid.
        seed: the phantom's seed (noise seeds derive from it).
        phase: its contrast phase, one of :data:`~MedDiffFMLib.anatomy.CONTRAST_PHASES`.
    """

    name: str
    family: str
    region: str
    clean_hu: np.ndarray
    labels: np.ndarray
    label_names: dict
    lesion_mask: np.ndarray
    ijk_to_ras: np.ndarray
    seed: int
    phase: str

    @property
    def body(self) -> np.ndarray:
        return self.labels > 0

    @property
    def spacing_kji(self) -> np.ndarray:
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)[::-1].copy()

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing_kji)) / 1000.0

    def volume(self, array: Optional[np.ndarray] = None) -> Volume:
        return Volume(self.clean_hu if array is None else array, self.ijk_to_ras)

    def label_volume(self) -> Volume:
        return Volume(self.labels, self.ijk_to_ras)

    def noisy(self, noise_hu: float, seed: int) -> np.ndarray:
        """The truth plus the family's own CT noise (float32, new array)."""
        if self.family == "heldout":
            from ..heldout import add_ct_noise

            return add_ct_noise(self.clean_hu, noise_hu, seed, self.spacing_kji)
        from ..phantoms import add_ct_noise

        return add_ct_noise(self.clean_hu, noise_hu, seed, tuple(self.spacing_kji)).astype(np.float32)


def case_region(i: int) -> str:
    return REGIONS[i % len(REGIONS)]


def case_seed(seed_start: int, i: int) -> int:
    return int(seed_start) + SEEDS_PER_CASE * int(i)


def tuning_seed(seed_start: int, region: str) -> int:
    """The seed of the separate case that tunes the Gaussian baseline for ``region``."""
    return int(seed_start) + TUNING_SEED_OFFSET + SEEDS_PER_CASE * REGIONS.index(region)


def focus_ras(region: str, seed: int) -> np.ndarray:
    from ..heldout.regions import FOCUS_RAS

    jitter = np.random.default_rng([int(seed), 78]).uniform(-6.0, 6.0, 3)
    return np.asarray(FOCUS_RAS[region], dtype=np.float64) + jitter


def clinical_grid(region: str, seed: int, fov_mm: Sequence[float], slice_mm: Optional[float] = None,
                  slices_multiple_of: int = 1) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An oblique clinical grid for case ``seed``: (ijk_to_ras, shape_kji).

    In-plane spacing (j = i) uniform in :data:`INPLANE_MM`, slice spacing ``slice_mm`` or
    uniform in :data:`SLICE_MM`; direction = DICOM's patient axes (i to the left, j
    posterior, k superior) rotated about a random axis by 3-15 degrees; the grid's centre
    on the region's focus. ``slices_multiple_of`` rounds the slice count (super-resolution).
    """
    rng = np.random.default_rng([int(seed), 77])
    inplane = float(rng.uniform(*INPLANE_MM))
    thickness = float(slice_mm) if slice_mm is not None else float(rng.uniform(*SLICE_MM))
    axis = rng.standard_normal(3)
    angle = np.deg2rad(rng.uniform(*MAX_TILT_DEG))
    direction = _rotation(axis, angle) @ np.diag([-1.0, -1.0, 1.0])
    spacing = np.array([thickness, inplane, inplane])
    shape = [max(4, int(round(f / s))) for f, s in zip(fov_mm, spacing)]
    shape[0] = max(slices_multiple_of, shape[0] // slices_multiple_of * slices_multiple_of)
    matrix = make_ijk_to_ras(spacing, (0.0, 0.0, 0.0), direction)
    centre_ijk = (np.array(shape[::-1], dtype=np.float64) - 1.0) / 2.0
    matrix[:3, 3] = focus_ras(region, seed) - matrix[:3, :3] @ centre_ijk
    return matrix, (int(shape[0]), int(shape[1]), int(shape[2]))


def superres_grid(region: str, seed: int, fov_mm: Sequence[float], factor: int):
    """The thin-slice truth grid of a super-resolution case: slices of 0.8-1.0 mm, a slice
    count that is a multiple of ``factor`` (so the thick slices are whole slabs)."""
    thin = float(np.random.default_rng([int(seed), 79]).uniform(*SUPERRES_THIN_MM))
    return clinical_grid(region, seed, fov_mm, slice_mm=thin, slices_multiple_of=factor)


# the held-out family's own names for its contrast phases -> the library's
HELDOUT_PHASES = {"native": "native", "arterial": "arterial", "portal": "portal_venous"}


def make_case(family: str, region: str, seed: int, grid: tuple[np.ndarray, Sequence[int]], lesions: int = 0) -> Case:
    """The phantom of ``family`` for ``region`` and ``seed`` on ``grid``, noise-free."""
    matrix, shape = grid
    name = f"{family} {region} {seed}"
    if family == "heldout":
        from ..heldout import make_heldout_case

        ph = make_heldout_case(region, seed, matrix, shape, lesions=lesions)
        return Case(name, family, region, ph.clean_hu, ph.labels, ph.label_names, ph.lesion_mask, ph.ijk_to_ras,
                    seed, HELDOUT_PHASES[ph.plan.phase])
    if family == "training":
        from ..phantoms import make_phantom

        spacing = tuple(float(s) for s in np.linalg.norm(matrix[:3, :3], axis=0)[::-1])
        ph = make_phantom(region, shape_kji=tuple(shape), spacing_kji=spacing, seed=seed, lesions=lesions,
                          noise_hu=0.0, ijk_to_ras=matrix)
        return Case(name, family, region, ph.clean_hu.astype(np.float32), ph.labels, dict(ph.label_names),
                    ph.lesion_mask, np.asarray(ph.ijk_to_ras, dtype=np.float64), seed, ph.phase)
    raise ValueError(f"unknown phantom family {family!r}")


def _rotation(axis, angle: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)
