"""The one in-memory image type: an array on a grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Volume:
    """An image or label map on a grid.

    Attributes:
        array: (k, j, i) array. Float32 HU for images, integer labels or bool for masks.
        ijk_to_ras: (4, 4) float64 matrix mapping voxel indices (i, j, k, 1) to RAS mm. The
            origin is the centre of voxel (0, 0, 0), as in Slicer.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if self.ijk_to_ras.shape != (4, 4):
            raise ValueError(f"ijk_to_ras must be 4x4, got {self.ijk_to_ras.shape}")
        if self.array.ndim != 3:
            raise ValueError(f"a volume must be 3-D (k, j, i), got an array of shape {self.array.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_kji(self) -> np.ndarray:
        """Voxel size in mm along the array axes (k, j, i)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)[::-1].copy()
