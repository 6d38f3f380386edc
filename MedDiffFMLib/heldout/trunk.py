"""Parts the chest and abdomen recipes share: body walls, spine, back muscles, ribs, vessels."""

from __future__ import annotations

import numpy as np

from .builder import Builder
from .shapes import ArcTube, SplineTube, Superquadric, rotation_matrix


def body_walls(b: Builder, half_width_mm: float, half_depth_mm: float) -> tuple[Superquadric, Superquadric]:
    """Skin-to-cavity layers (subcutaneous fat, muscle wall, cavity fat), all "body" label;
    what is added next stays inside the cavity. Returns (outer body, cavity)."""
    body = Superquadric(np.array([0.0, b.uniform(-4, 4), 0.0]), np.array([half_width_mm, half_depth_mm, 900.0]),
                        b.uniform(2.2, 2.8), b.rotation(0.03))
    fat_mm = b.uniform(8.0, 30.0)  # habitus
    wall_mm = b.uniform(8.0, 14.0)
    b.add("body", body, b.tissue("fat"), 6.0)
    b.add("body", body.shrunk(fat_mm), b.tissue("muscle"), 5.0)
    cavity = body.shrunk(fat_mm + wall_mm)
    b.add("body", cavity, b.tissue("visceral_fat"), 8.0)
    b.contain_in_last()
    return body, cavity


def spine(b: Builder, names: list[str], z_top_mm: float, pitch_mm: float, y_mm: float,
          body_radii_mm: tuple[float, float]) -> None:
    """Vertebrae from ``names[0]`` at ``z_top_mm`` downwards: a cortical body shell with marrow,
    the arch behind it, a disc between levels; the spinal canal (spinal_cord) through them."""
    rx, ry = body_radii_mm
    half_height = 0.36 * pitch_mm
    for n, name in enumerate(names):
        z = z_top_mm - n * pitch_mm + b.uniform(-1.5, 1.5)
        tilt = b.rotation(0.06)
        b.add("body", Superquadric(np.array([0.0, y_mm, z - pitch_mm / 2]), np.array([rx * 0.95, ry * 0.95,
              0.16 * pitch_mm]), 2.4, tilt), b.tissue("disc"), 4.0)
        b.add_bone(name, Superquadric(np.array([0.0, y_mm, z]), b.vary([rx, ry, half_height], 0.06), 2.6, tilt))
        b.add_bone(name, Superquadric(np.array([0.0, y_mm - ry - 14.0, z + 0.1 * pitch_mm]),
                                      np.array([rx * 1.1, 7.0, 0.28 * pitch_mm]), 2.0, tilt), cortex_mm=1.2)
        b.add_bone(name, Superquadric(np.array([0.0, y_mm - ry - 26.0, z]), np.array([4.0, 12.0, 0.22 * pitch_mm]),
                                      2.0, tilt), cortex_mm=1.0)
    z_knots = np.linspace(z_top_mm + pitch_mm, z_top_mm - len(names) * pitch_mm, 5)[::-1]
    canal_xy = np.column_stack([b.rng.uniform(-1.5, 1.5, 5), y_mm - ry - 7.0 + b.rng.uniform(-1, 1, 5)])
    b.add("spinal_cord", SplineTube(np.zeros(3), np.eye(3), z_knots, canal_xy, np.full(5, 0.45 * rx)),
          b.tissue("cord"), 2.0)


def back_muscles(b: Builder, y_spine_mm: float, spine_depth_mm: float) -> None:
    """The erector spinae beside and behind the spine (painted before the vertebrae)."""
    for side, name in ((-1.0, "autochthon_left"), (1.0, "autochthon_right")):
        blob = b.blob([side * 30.0, y_spine_mm - spine_depth_mm - 22.0, 0.0], [20.0, 22.0, 500.0], 0.04, 3, 0.04)
        b.add(name, blob, b.tissue("muscle") + b.uniform(-4, 4), 6.0)


def ribs(b: Builder, numbers: list[int], z_first_mm: float, pitch_mm: float, y_centre_mm: float,
         half_width_mm: float, half_depth_mm: float) -> None:
    """Ribs as tubes on tilted elliptic arcs hugging the inside of the wall, both sides."""
    for n, number in enumerate(numbers):
        z = z_first_mm - n * pitch_mm
        tilt = rotation_matrix((-0.45 + b.uniform(-0.05, 0.05), 0.0, 0.0))
        semi = np.array([half_width_mm * b.uniform(0.9, 0.97), half_depth_mm * b.uniform(0.85, 0.95)])
        radius = b.uniform(4.0, 5.5)
        for name, angle_from, angle_to in ((f"rib_right_{number}", -1.35, 0.55),
                                           (f"rib_left_{number}", np.pi - 0.55, np.pi + 1.35)):
            arc = ArcTube(np.array([0.0, y_centre_mm, z]), tilt, semi, radius, angle_from, angle_to)
            b.add_bone(name, arc, cortex_mm=1.3)


def vessel(b: Builder, name: str, xy_mm, z_range_mm: tuple[float, float], radius_mm: float, hu: float,
           wiggle_mm: float = 3.0) -> SplineTube:
    """A vessel along z, its centre line wandering by ``wiggle_mm``."""
    z_knots = np.linspace(z_range_mm[0], z_range_mm[1], 5)
    xy = np.asarray(xy_mm, dtype=np.float64) + b.rng.uniform(-wiggle_mm, wiggle_mm, (5, 2))
    tube = SplineTube(np.zeros(3), np.eye(3), z_knots, xy, b.vary(np.full(5, radius_mm), 0.1))
    b.add(name, tube, hu, 3.0)
    return tube
