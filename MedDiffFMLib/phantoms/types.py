"""The phantom's public types: :class:`Phantom` and :class:`Lesion`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..volume import Volume


@dataclass
class Lesion:
    """One inserted lesion.

    Attributes:
        center_kji: lesion centre in voxel indices (k, j, i).
        radius_mm: nominal radius in mm.
        organ: TotalSegmentator name of the organ that holds it.
        contrast_hu: signed mean HU change of the lesion against the organ.
        kind: "round" or "irregular".
        voxels: number of voxels in its mask.
        center_ras: lesion centre in RAS mm (None when inserted into bare arrays).
    """

    center_kji: tuple[float, float, float]
    radius_mm: float
    organ: str
    contrast_hu: float
    kind: str
    voxels: int
    center_ras: tuple[float, float, float] | None = None


@dataclass
class Phantom:
    """A synthetic CT volume with its labels.

    Attributes:
        hu: (k, j, i) float32 image in HU, with texture and CT noise (if any was asked for).
        labels: (k, j, i) uint8 label map: TotalSegmentator v2 indices, ``anatomy.BODY_LABEL``
            for body tissue no other class claims, 0 outside the body.
        label_names: label value -> class name, for the values present.
        lesion_mask: (k, j, i) bool, True exactly on lesion voxels (all False without lesions).
        ijk_to_ras: (4, 4) float64 voxel-index -> RAS (mm) matrix.
        region: one of :data:`REGIONS`.
        clean_hu: (k, j, i) float32, ``hu`` without the CT noise (denoising ground truth).
        lesions: what :func:`insert_lesions` put in.
        phase: contrast phase, one of :data:`~.tissues.PHASES`.
    """

    hu: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    lesion_mask: np.ndarray
    ijk_to_ras: np.ndarray
    region: str
    clean_hu: np.ndarray
    lesions: list[Lesion] = field(default_factory=list)
    phase: str = "native"

    @property
    def contrast(self) -> bool:
        """Whether blood is iodine-enhanced (any phase but native)."""
        return self.phase != "native"

    @property
    def spacing_kji(self) -> tuple[float, float, float]:
        """Voxel size in mm along (k, j, i)."""
        s = np.linalg.norm(np.asarray(self.ijk_to_ras)[:3, :3], axis=0)[::-1]
        return tuple(float(v) for v in s)  # type: ignore[return-value]

    def volume(self) -> Volume:
        """The image as a :class:`Volume` (shares the array)."""
        return Volume(self.hu, self.ijk_to_ras)

    def label_volume(self) -> Volume:
        """The label map as a :class:`Volume` (shares the array)."""
        return Volume(self.labels, self.ijk_to_ras)
