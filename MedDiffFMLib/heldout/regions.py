"""Region recipes of the held-out family: which structures, where, how bright.

Sizes are adult-like in mm, varied per seed (habitus, organ size and position, contrast
phase, a smooth random deformation of the whole space). RAS convention: +x the patient's
right, +y anterior, +z superior; the body axis is z and the trunk is centred on x = y = 0.
"""

from __future__ import annotations

import numpy as np

from .builder import Builder
from .shapes import Cut, Metaballs, SplineTube, Superquadric, rotation_matrix
from .trunk import back_muscles, body_walls, ribs, spine, vessel

# where benchmark grids are centred, per region (RAS mm, before per-case jitter)
FOCUS_RAS = {"head_neck": (0.0, 5.0, 35.0), "chest": (0.0, 0.0, 5.0), "abdomen": (10.0, 0.0, 25.0)}
# organs that receive lesions, per region (TotalSegmentator names)
LESION_ORGANS = {
    "abdomen": ("liver", "spleen", "kidney_left", "kidney_right"),
    "chest": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_lower_lobe_right"),
    "head_neck": ("brain",),
}


def abdomen(b: Builder) -> None:
    half_width, half_depth = b.uniform(135, 175), b.uniform(95, 130)
    body_walls(b, half_width, half_depth)
    y_spine = -half_depth + b.uniform(48, 60)
    b.add("liver", b.blob([0.45 * half_width, 0.1 * half_depth, 55], [85, 78, 78], 0.2, 5, 0.07),
          b.tissue("liver"), 7.0)
    liver = b.structures[-1].shape
    b.add("gallbladder", b.blob(liver.centre + [-12, 35, -40], [14, 16, 28], 0.3, 2, 0.05),
          b.tissue("gallbladder"), 1.0)
    b.add("spleen", b.blob([-0.55 * half_width, -0.25 * half_depth, 50], [28, 50, 55], 0.2, 4, 0.06, about_z=0.5),
          b.tissue("spleen"), 6.0)
    stomach_centres = np.array([-0.25 * half_width, 0.35 * half_depth, 65]) + b.rng.uniform(-25, 25, (5, 3))
    stomach = Metaballs(stomach_centres, b.rng.uniform(20, 30, 5), b.rng.uniform(0.8, 1.2, 5))
    b.add("stomach", stomach, b.tissue("bowel") - 8.0, 5.0)
    gas_level = float(stomach_centres[:, 1].max()) - b.uniform(0, 10)
    b.add("stomach", Cut(stomach, np.array([[0, 1, 0, 0, gas_level, 0]])), b.tissue("gas"), 10.0)
    pancreas_path = np.linspace([25, y_spine + 55, 10], [-70, y_spine + 40, 35], 6) + b.rng.uniform(-5, 5, (6, 3))
    b.add("pancreas", Metaballs(pancreas_path, b.rng.uniform(10, 13, 6), np.ones(6)), b.tissue("pancreas"),
          9.0)
    for side, name in ((1.0, "kidney_right"), (-1.0, "kidney_left")):
        kidney = b.blob([side * 58, y_spine + 8, -10 - 8 * side], [24, 28, 50], 0.15, 3, 0.05,
                        about_z=-side * 0.4)
        b.add(name, kidney, b.tissue("kidney_cortex"), 5.0)
        b.add(name, kidney.shrunk(6.5), b.tissue("kidney_medulla"), 5.0)
    bowel = np.column_stack([b.rng.uniform(-90, 90, 12), b.rng.uniform(-0.1, 0.6, 12) * half_depth,
                             b.rng.uniform(-140, -20, 12)])
    b.add("small_bowel", Metaballs(bowel, b.rng.uniform(12, 18, 12), b.rng.uniform(0.8, 1.2, 12)),
          b.tissue("bowel"), 8.0)
    rot_x = rotation_matrix((0.0, np.pi / 2, 0.0))  # frame z along world x: the transverse colon
    colon = SplineTube(np.array([0.0, 0.45 * half_depth, b.uniform(-5, 15)]), rot_x, np.linspace(-100, 100, 5),
                       b.rng.uniform(-8, 8, (5, 2)), np.full(5, b.uniform(16, 22)))
    b.add_walled("colon", colon, 3.0, b.tissue("bowel"), b.tissue("stool"), 60.0)
    vessel(b, "aorta", [-14, y_spine + 32], (-160, 160), b.uniform(9, 13), b.tissue("blood"))
    vessel(b, "inferior_vena_cava", [22, y_spine + 30], (-160, 160), b.uniform(9, 12),
           b.tissue("blood") * (0.3 if b.phase == "arterial" else 0.9))
    vessel(b, "portal_vein_and_splenic_vein", [28, y_spine + 65], (5, 40), 7.0, b.tissue("blood") * 0.9)
    b.container = 1  # from here on: anywhere inside the body
    for side, name in ((-1.0, "iliopsoas_left"), (1.0, "iliopsoas_right")):
        b.add(name, b.blob([side * 42, y_spine + 6, -80], [17, 17, 75], 0.05, 3, 0.05), b.tissue("muscle"), 6.0)
    back_muscles(b, y_spine, 17.0)
    spine(b, ["vertebrae_T11", "vertebrae_T12", "vertebrae_L1", "vertebrae_L2", "vertebrae_L3", "vertebrae_L4",
              "vertebrae_L5"], 120.0, b.uniform(30, 35), y_spine, (21.0, 17.0))
    ribs(b, [9, 10, 11, 12], 115.0, 24.0, y_spine + 30, half_width - 18, half_depth - 14)


def chest(b: Builder) -> None:
    half_width, half_depth = b.uniform(150, 185), b.uniform(100, 130)
    body_walls(b, half_width, half_depth)
    y_spine = -half_depth + b.uniform(50, 62)
    lung_side = {1.0: "right", -1.0: "left"}
    for side in (1.0, -1.0):
        lung = b.blob([side * 0.45 * half_width, 8, 15], [0.38 * half_width, 0.8 * half_depth, 140], 0.08, 5, 0.05)
        oblique = np.array([[0, 0.55, 0.83, 0, 0, 10 + b.uniform(-10, 10)]])
        names = lung_side[side]
        lobes = tuple(n for n in LESION_ORGANS["chest"] + ("lung_middle_lobe_right",) if n.endswith(names))
        b.add(f"lung_lower_lobe_{names}", lung, b.tissue("lung"), 30.0)
        if side > 0:
            b.add("lung_middle_lobe_right", Cut(lung, oblique), b.tissue("lung"), 30.0)
            horizontal = np.array([[0, 0, 1, 0, 0, 25 + b.uniform(-8, 8)]])
            b.add("lung_upper_lobe_right", Cut(lung, np.concatenate([oblique, horizontal])), b.tissue("lung"), 30.0)
        else:
            b.add("lung_upper_lobe_left", Cut(lung, oblique), b.tissue("lung"), 30.0)
        for _ in range(5):  # pulmonary vessels, kept inside the lung
            start = lung.centre + b.rng.uniform(-30, 30, 3) * [1, 1, 2]
            tube = SplineTube(start, b.rotation(0.6), np.linspace(-60, 60, 4), b.rng.uniform(-12, 12, (4, 2)),
                              np.linspace(b.uniform(3, 5), 1.5, 4))
            b.add("pulmonary_vein", tube, b.tissue("blood") * 0.8, 3.0, over_labels=lobes)
    heart = b.blob([-0.1 * half_width, 0.3 * half_depth, -15], [60, 52, 58], 0.15, 3, 0.05, about_z=0.5)
    b.add("heart", heart, b.tissue("myocardium"), 4.0)
    b.add("heart", heart.shrunk(9.0), b.tissue("blood"), 3.0)
    vessel(b, "aorta", [10, 0.3 * half_depth], (20, 75), b.uniform(13, 16), b.tissue("blood"))
    vessel(b, "aorta", [-22, y_spine + 30], (-160, 75), b.uniform(10, 13), b.tissue("blood"))
    vessel(b, "superior_vena_cava", [32, 0.25 * half_depth], (10, 110), b.uniform(8, 10), b.tissue("blood") * 0.6)
    trachea = SplineTube(np.zeros(3), np.eye(3), np.linspace(25, 160, 4),
                         np.array([0.0, y_spine + 55]) + b.rng.uniform(-2, 2, (4, 2)), np.full(4, b.uniform(8, 10)))
    b.add_walled("trachea", trachea, 2.0, b.tissue("muscle") - 10, b.tissue("gas") - 30, 3.0)
    vessel(b, "esophagus", [6, y_spine + 32], (-160, 160), 7.0, b.tissue("muscle") - 8)
    b.container = 1  # from here on: anywhere inside the body
    b.add_bone("sternum", Superquadric(np.array([0.0, half_depth - 25, 10]), np.array([16, 7, 90]), 2.5,
                                       b.rotation(0.05)))
    for side, name in ((1.0, "scapula_right"), (-1.0, "scapula_left")):
        blade = Superquadric(np.array([side * 0.65 * half_width, -half_depth + 30, 50]), np.array([45, 6, 60]), 2.2,
                             rotation_matrix((0.0, 0.0, side * 0.5)))
        b.add_bone(name, blade, cortex_mm=1.2)
    names = [f"vertebrae_T{n}" for n in range(1, 13)]
    back_muscles(b, y_spine, 14.0)
    spine(b, names, 150.0, b.uniform(23, 26), y_spine, (17.0, 14.0))
    ribs(b, list(range(2, 11)), 130.0, b.uniform(20, 24), y_spine + 25, half_width - 16, half_depth - 12)


def head_neck(b: Builder) -> None:
    neck = Cut(Superquadric(np.array([0.0, -5.0, -60.0]), b.vary([58, 60, 90], 0.1), 2.2),
               np.array([[0, 0, -1, 0, 0, 20]]))
    head = b.blob([0, 5, 60], [72, 92, 95], 0.05, 4, 0.03, vary_position_mm=3)
    b.add("body", neck, b.tissue("fat"), 6.0)
    b.add("body", neck.shrunk(8.0), b.tissue("muscle"), 5.0)
    b.add("body", head, b.tissue("muscle") - 10, 5.0)
    scalp = b.uniform(4, 7)
    table = b.uniform(6, 9)
    base = np.array([[0, 0, 1, 0, 0, 15 + b.uniform(-4, 4)]])
    b.add_bone("skull", Cut(head.shrunk(scalp), base), cortex_mm=2.0)
    b.add_bone("skull", Superquadric(np.array([0.0, 10.0, 18.0]), np.array([55, 70, 5]), 2.0, b.rotation(0.05)))
    brain = Cut(head.shrunk(scalp + table), base + [0, 0, 0, 0, 0, 6])
    b.add("brain", brain, b.tissue("grey_matter"), 3.0)
    b.add("brain", Cut(head.shrunk(scalp + table + 11), base + [0, 0, 0, 0, 0, 14]), b.tissue("white_matter"), 2.5)
    for side in (-1.0, 1.0):
        b.add("brain", b.blob([side * 7, 3, 60], [4, 20, 9], 0.1, 2, 0.1), b.tissue("csf"), 1.0)
        b.add("body", b.blob([side * 32, 72, 32], [12, 12, 12], 0.0, 0, 0.0, vary_position_mm=2),
              b.tissue("eye"), 1.0)
        b.add("body", b.blob([side * 26, 50, 8], [13, 16, 17], 0.1, 2, 0.08), b.tissue("gas"), 5.0)
    spine(b, [f"vertebrae_C{n}" for n in range(1, 8)], 5.0, b.uniform(15, 18), -25.0, (15.0, 12.0))
    airway = SplineTube(np.zeros(3), np.eye(3), np.linspace(-160, 0, 4), np.array([0.0, 22.0]) +
                        b.rng.uniform(-2, 2, (4, 2)), np.full(4, b.uniform(7, 9)))
    b.add_walled("trachea", airway, 2.0, b.tissue("muscle") - 10, b.tissue("gas") - 30, 3.0)
    vessel(b, "esophagus", [0, 6], (-160, -15), 6.0, b.tissue("muscle") - 8, wiggle_mm=1.5)
    for side, name in ((-1.0, "common_carotid_artery_left"), (1.0, "common_carotid_artery_right")):
        vessel(b, name, [side * 28, 10], (-160, 10), b.uniform(3.5, 5), b.tissue("blood"), wiggle_mm=2)
        b.add("thyroid_gland", b.blob([side * 17, 24, -100], [9, 9, 22], 0.1, 2, 0.06), b.tissue("thyroid"), 6.0)
        b.add(f"autochthon_{'left' if side < 0 else 'right'}", b.blob([side * 22, -55, -60], [18, 18, 70], 0.05),
              b.tissue("muscle"), 6.0)


RECIPES = {"head_neck": head_neck, "chest": chest, "abdomen": abdomen}
