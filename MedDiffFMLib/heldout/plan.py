"""What a held-out phantom is made of: structures painted in order over a deformed space."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .. import anatomy
from .shapes import Deformation, Shape
from .texture import Texture

BODY_NAME = "body"
LABEL_OF_NAME: dict[str, int] = {name: value for value, name in anatomy.DEFAULT_LABEL_NAMES.items()}
AIR_HU = -1000.0


@dataclass
class Structure:
    """One solid painted over what came before.

    Attributes:
        label_name: TotalSegmentator class name, or "body" (label 255) for tissue without one.
        shape: where it is, in the plan's deformed space (mm).
        hu: mean intensity, HU.
        texture_hu: amplitude of the tissue texture (HU per unit of the unit-variance field).
        host_label_name: lesions only: painted only over voxels of this class (the organ
            keeps its label; the lesion mask records the lesion).
        over_labels: when not empty, painted only over voxels of these classes (vessels
            inside a lung).
        container: painted only where structure number ``container`` (1-based, in painting
            order) or a later one is already painted, e.g. organs inside the body cavity;
            0 = anywhere.
    """

    label_name: str
    shape: Shape
    hu: float
    texture_hu: float = 0.0
    host_label_name: Optional[str] = None
    over_labels: tuple[str, ...] = ()
    container: int = 0

    @property
    def is_lesion(self) -> bool:
        return self.host_label_name is not None

    @property
    def label(self) -> int:
        return label_value(self.host_label_name if self.is_lesion else self.label_name)


@dataclass
class LesionRecord:
    """One lesion of a plan: where (deformed space), how large and how bright."""

    organ: str
    centre_mm: tuple[float, float, float]
    radius_mm: float
    contrast_hu: float
    kind: str  # "round" or "irregular"


@dataclass
class PhantomPlan:
    """A continuous phantom: render it on any grid with :func:`..render.render_plan`.

    Attributes:
        region: "head_neck", "chest" or "abdomen".
        seed: the seed it was drawn from.
        structures: painted in order; later ones cover earlier ones.
        deformation: maps a physical RAS point to the space the shapes live in.
        texture: unit-variance texture field (physical RAS).
        focus_ras: a point of interest (mm) where benchmark grids are centred.
        phase: contrast phase, "native", "arterial" or "portal".
        lesions: what the lesion structures are.
    """

    region: str
    seed: int
    structures: list[Structure]
    deformation: Deformation
    texture: Texture
    focus_ras: np.ndarray
    phase: str
    lesions: list[LesionRecord] = field(default_factory=list)


def label_value(name: str) -> int:
    if name == BODY_NAME:
        return anatomy.BODY_LABEL
    try:
        return LABEL_OF_NAME[name]
    except KeyError:
        raise ValueError(f"{name!r} is not a TotalSegmentator v2 class name") from None
