"""Random drawing helpers shared by the region recipes of the held-out family."""

from __future__ import annotations

import numpy as np

from .plan import Structure
from .shapes import Deformation, StarBlob, rotation_matrix, shell

PHASES = ("native", "arterial", "portal")
# tissue -> HU in the native, arterial and portal-venous phase
TISSUE_HU: dict[str, tuple[float, float, float]] = {
    "blood": (42.0, 290.0, 165.0), "liver": (58.0, 72.0, 112.0), "spleen": (48.0, 105.0, 118.0),
    "kidney_cortex": (33.0, 185.0, 170.0), "kidney_medulla": (30.0, 75.0, 150.0), "pancreas": (42.0, 110.0, 95.0),
    "myocardium": (45.0, 105.0, 100.0), "bowel": (36.0, 75.0, 95.0), "thyroid": (100.0, 160.0, 150.0),
    "muscle": (50.0, 55.0, 60.0), "fat": (-100.0, -100.0, -98.0), "visceral_fat": (-92.0, -90.0, -88.0),
    "gallbladder": (8.0, 8.0, 9.0), "csf": (7.0, 7.0, 7.0), "grey_matter": (38.0, 40.0, 41.0),
    "white_matter": (28.0, 29.0, 30.0), "disc": (85.0, 88.0, 90.0), "cord": (32.0, 34.0, 35.0),
    "lung": (-850.0, -845.0, -845.0), "gas": (-920.0, -920.0, -920.0), "cortical_bone": (950.0, 950.0, 950.0),
    "cancellous_bone": (230.0, 230.0, 230.0), "stool": (-250.0, -250.0, -250.0), "eye": (12.0, 12.0, 12.0),
}


class Builder:
    """Accumulates the structures of one plan, drawing sizes and intensities from ``rng``."""

    def __init__(self, rng: np.random.Generator, phase: str):
        self.rng = rng
        self.phase = phase
        self.structures: list[Structure] = []
        self.container = 0  # structures added now paint only over this one (1-based) and later ones

    def contain_in_last(self) -> None:
        """Structures added from now on stay inside the last one added (and what is painted over it)."""
        self.container = len(self.structures)

    # ------------------------------------------------------------------ random numbers
    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def vary(self, value, fraction: float):
        """``value`` times (1 + U(-fraction, fraction)), elementwise."""
        v = np.asarray(value, dtype=np.float64)
        return v * (1.0 + self.rng.uniform(-fraction, fraction, v.shape))

    def harmonics(self, count: int, strength: float, max_frequency: float = 2.5) -> np.ndarray:
        """Rows (b, wx, wy, wz, phase) for :class:`StarBlob`: low-frequency radial bumps."""
        w = self.rng.standard_normal((count, 3))
        w *= (self.rng.uniform(1.0, max_frequency, count) / np.linalg.norm(w, axis=1))[:, None]
        b = self.rng.uniform(0.3, 1.0, count) * strength
        return np.column_stack([b, w, self.rng.uniform(0, 2 * np.pi, count)])

    def rotation(self, spread_rad: float, about_z: float = 0.0) -> np.ndarray:
        return rotation_matrix(self.rng.uniform(-spread_rad, spread_rad, 3) + np.array([0.0, 0.0, about_z]))

    def blob(self, centre, radii, spread_rad: float = 0.15, bumps: int = 4, bump_strength: float = 0.06,
             about_z: float = 0.0, vary_position_mm: float = 6.0, vary_size: float = 0.12) -> StarBlob:
        centre = np.asarray(centre, dtype=np.float64) + self.rng.uniform(-vary_position_mm, vary_position_mm, 3)
        return StarBlob(centre, self.vary(radii, vary_size), self.rotation(spread_rad, about_z),
                        self.harmonics(bumps, bump_strength))

    def tissue(self, name: str) -> float:
        """HU of a tissue in this plan's phase, varied by a few HU."""
        return float(TISSUE_HU[name][PHASES.index(self.phase)] + self.rng.uniform(-5.0, 5.0))

    # ------------------------------------------------------------------ structures
    def add(self, label_name: str, shape, hu: float, texture_hu: float = 0.0, over_labels: tuple[str, ...] = ()) -> None:
        self.structures.append(Structure(label_name, shape, float(hu), float(texture_hu), None, tuple(over_labels),
                                         self.container))

    def add_bone(self, label_name: str, shape, cortex_mm: float = 1.6) -> None:
        """A bone: dense cortex shell over cancellous marrow, one label."""
        self.add(label_name, shape, self.tissue("cortical_bone") + self.uniform(-150, 150), 25.0)
        self.add(label_name, shape.shrunk(cortex_mm), self.tissue("cancellous_bone") + self.uniform(-60, 60), 40.0)

    def add_walled(self, label_name: str, shape, wall_mm: float, wall_hu: float, content_hu: float,
                   texture_hu: float = 4.0) -> None:
        """A hollow organ or airway: wall and content under one label."""
        self.add(label_name, shell(shape, wall_mm), wall_hu, texture_hu)
        self.add(label_name, shape.shrunk(wall_mm), content_hu, texture_hu)

    def deformation(self, amplitude_mm: float = 5.0, terms: int = 4) -> Deformation:
        """Random smooth displacement, wavelengths 90-220 mm."""
        direction = self.rng.standard_normal((terms, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        k = direction * (2 * np.pi / self.rng.uniform(90.0, 220.0, terms))[:, None]
        a = self.rng.standard_normal((terms, 3))
        a *= (amplitude_mm / np.sqrt(terms) / np.linalg.norm(a, axis=1))[:, None]
        return Deformation(np.column_stack([a, k, self.rng.uniform(0, 2 * np.pi, terms)]))
