"""Anatomy condition: TotalSegmentator class names -> the model's anatomy channels.

Encoding choice: *grouped one-hot*. The ~117 TotalSegmentator classes are mapped by name to
``len(GROUPS)`` tissue groups (bone, lung, liver, ...), plus a body channel and a "condition
given" flag. We prefer this to MAISI's bit encoding (labels as 8 binary digits) because:

* multi-level training resizes whole volumes and 2x crops to the window; one-hot channels
  resize into meaningful partial volumes, whereas interpolated bits decode to unrelated
  classes;
* neighbouring label indices (e.g. ``kidney_cyst_left`` = 23, ``sacrum`` = 25) share bits
  but not appearance; groups share appearance (all vertebrae and ribs are bone), which is
  what a CT prior needs and what small training sets can actually learn;
* a null condition (dropout) is simply all zeros with the flag off.

A label map is reduced to one int8 *group map*: 0 outside the body, 1 body tissue that no
organ group claims, ``2 + g`` for group ``g``. Group maps are cheap to crop per window and
are expanded to channels by :func:`group_channels`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

import numpy as np

if TYPE_CHECKING:
    import torch

# TotalSegmentator v2 "total" task: label index -> class name.
_VERTEBRAE = ["S1", "L5", "L4", "L3", "L2", "L1"] + [f"T{i}" for i in range(12, 0, -1)] + [
    f"C{i}" for i in range(7, 0, -1)
]
TOTALSEGMENTATOR_V2: dict[int, str] = {
    1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
    7: "pancreas", 8: "adrenal_gland_right", 9: "adrenal_gland_left", 10: "lung_upper_lobe_left",
    11: "lung_lower_lobe_left", 12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right",
    14: "lung_lower_lobe_right", 15: "esophagus", 16: "trachea", 17: "thyroid_gland",
    18: "small_bowel", 19: "duodenum", 20: "colon", 21: "urinary_bladder", 22: "prostate",
    23: "kidney_cyst_left", 24: "kidney_cyst_right", 25: "sacrum",
    **{26 + n: f"vertebrae_{v}" for n, v in enumerate(_VERTEBRAE)},
    51: "heart", 52: "aorta", 53: "pulmonary_vein", 54: "brachiocephalic_trunk",
    55: "subclavian_artery_right", 56: "subclavian_artery_left", 57: "common_carotid_artery_right",
    58: "common_carotid_artery_left", 59: "brachiocephalic_vein_left", 60: "brachiocephalic_vein_right",
    61: "atrial_appendage_left", 62: "superior_vena_cava", 63: "inferior_vena_cava",
    64: "portal_vein_and_splenic_vein", 65: "iliac_artery_left", 66: "iliac_artery_right",
    67: "iliac_vena_left", 68: "iliac_vena_right", 69: "humerus_left", 70: "humerus_right",
    71: "scapula_left", 72: "scapula_right", 73: "clavicula_left", 74: "clavicula_right",
    75: "femur_left", 76: "femur_right", 77: "hip_left", 78: "hip_right", 79: "spinal_cord",
    80: "gluteus_maximus_left", 81: "gluteus_maximus_right", 82: "gluteus_medius_left",
    83: "gluteus_medius_right", 84: "gluteus_minimus_left", 85: "gluteus_minimus_right",
    86: "autochthon_left", 87: "autochthon_right", 88: "iliopsoas_left", 89: "iliopsoas_right",
    90: "brain", 91: "skull",
    **{92 + n: f"rib_left_{n + 1}" for n in range(12)},
    **{104 + n: f"rib_right_{n + 1}" for n in range(12)},
    116: "sternum", 117: "costal_cartilages",
}
# The thresholded body mask (TotalSegmentator's "body" task name) has no index in the total
# task; we give it one outside that range. It marks body tissue that no other class claims.
BODY_LABEL = 255
DEFAULT_LABEL_NAMES: dict[int, str] = {**TOTALSEGMENTATOR_V2, BODY_LABEL: "body"}

# Tissue groups, in channel order. Patterns are full-match regular expressions on class names.
GROUPS: dict[str, tuple[str, ...]] = {
    "bone": (r"vertebrae_.*", r"rib_.*", r"skull", r"sternum", r"sacrum", r"hip_.*", r"femur_.*",
             r"humerus_.*", r"scapula_.*", r"clavicula_.*", r"costal_cartilages", r"mandible", r"bone.*"),
    "lung": (r"lung.*",),
    "airway": (r"trachea", r"airway.*", r"bronch.*"),
    "heart": (r"heart.*", r"atrial_appendage_.*"),
    "vessel": (r"aorta", r".*_artery.*", r".*_vein.*", r".*vena.*", r"brachiocephalic_trunk"),
    "liver": (r"liver",),
    "spleen": (r"spleen",),
    "kidney": (r"kidney.*", r"adrenal_gland_.*"),
    "gut": (r"stomach", r"small_bowel", r"duodenum", r"colon", r"esophagus"),
    "brain": (r"brain", r"spinal_cord"),
    "muscle": (r"gluteus_.*", r"autochthon_.*", r"iliopsoas_.*", r"muscle.*"),
    "other_organ": (r"pancreas", r"thyroid_gland", r"urinary_bladder", r"prostate", r"gallbladder"),
}
GROUP_NAMES: tuple[str, ...] = tuple(GROUPS)
# Typical HU per group on clinical CT at clinical voxel sizes (bone mixes cancellous and
# cortical, body tissue fat and muscle), per contrast phase: the arterial phase is the late
# arterial one, when the kidney's cortex and the pancreas enhance. Only a starting layout for
# synthesis: the model sets the final intensities.
CONTRAST_PHASES = ("native", "arterial", "portal_venous")
_UNENHANCED_HU = {"outside": -1000.0, "body tissue": -50.0, "bone": 400.0, "lung": -850.0, "airway": -1000.0,
                  "brain": 35.0}
TYPICAL_HU: dict[str, dict[str, float]] = {
    "native": {**_UNENHANCED_HU, "heart": 40.0, "vessel": 40.0, "liver": 60.0, "spleen": 50.0, "kidney": 30.0,
               "gut": 20.0, "muscle": 50.0, "other_organ": 40.0},
    "arterial": {**_UNENHANCED_HU, "heart": 250.0, "vessel": 300.0, "liver": 80.0, "spleen": 120.0,
                 "kidney": 180.0, "gut": 40.0, "muscle": 55.0, "other_organ": 90.0},
    "portal_venous": {**_UNENHANCED_HU, "heart": 150.0, "vessel": 160.0, "liver": 100.0, "spleen": 110.0,
                      "kidney": 150.0, "gut": 30.0, "muscle": 55.0, "other_organ": 60.0},
}
BODY_NAMES = ("body", "body_trunc", "body_extremities", "skin", "subcutaneous_fat", "soft_tissue")
# channels: one per group, one body channel, one "anatomy given" flag
NUM_CHANNELS = len(GROUP_NAMES) + 2


def group_of(name: str) -> int | None:
    """Group map value for a class name: 1 for body tissue, ``2 + g`` for group g, None if unknown."""
    if name in BODY_NAMES:
        return 1
    for g, patterns in enumerate(GROUPS.values()):
        if any(re.fullmatch(p, name) for p in patterns):
            return 2 + g
    return None


def typical_hu(groups: np.ndarray, phase: str) -> np.ndarray:
    """(k, j, i) float32 HU: each voxel of a group map at its group's :data:`TYPICAL_HU` in ``phase``."""
    if phase not in TYPICAL_HU:
        raise ValueError(f"unknown contrast phase {phase!r}; expected one of {', '.join(CONTRAST_PHASES)}")
    table = TYPICAL_HU[phase]
    lut = np.array([table["outside"], table["body tissue"]] + [table[g] for g in GROUP_NAMES], dtype=np.float32)
    return lut[np.clip(np.asarray(groups, dtype=np.int64), 0, None)]


def group_map(labels: np.ndarray, label_names: Mapping[int, str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Reduce a label map to the model's group map.

    Args:
        labels: (k, j, i) integer label map; 0 is background.
        label_names: label value -> class name; default :data:`DEFAULT_LABEL_NAMES`.

    Returns:
        ``(groups, unknown)``: the int8 group map of the same shape, and the sorted class names
        (or ``"label <n>"`` for values without a name) that map to no group. Voxels of unknown
        classes still count as body tissue: they are inside the patient.
    """
    names = DEFAULT_LABEL_NAMES if label_names is None else label_names
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iub":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise ValueError("an anatomy label map must hold integer labels")
        labels = labels.astype(np.int64)
    values = np.unique(labels)
    lut_size = int(values.max()) + 1 if values.size else 1
    if values.size and values.min() < 0:
        raise ValueError("label values must be >= 0")
    lut = np.zeros(lut_size, dtype=np.int8)
    unknown: list[str] = []
    for v in values:
        v = int(v)
        if v == 0:
            continue
        name = names.get(v)
        g = group_of(name) if name is not None else None
        if g is None:
            unknown.append(name if name is not None else f"label {v}")
            g = 1
        lut[v] = g
    return lut[labels], sorted(unknown)


def group_channels(groups: torch.Tensor | None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Expand a group map into the model's anatomy channels.

    Args:
        groups: (B, D, H, W) integer group map, or None for the null condition.
        shape: (B, D, H, W) to use when ``groups`` is None.

    Returns:
        (B, NUM_CHANNELS, D, H, W) float tensor: one-hot groups, body, and the "given" flag
        (all zeros for the null condition).
    """
    import torch  # here, so that the task registry can read the phases without torch

    if groups is None:
        assert shape is not None
        return torch.zeros((shape[0], NUM_CHANNELS, *shape[1:]))
    groups = groups.long()
    onehot = torch.nn.functional.one_hot(groups.clamp(min=0), num_classes=len(GROUP_NAMES) + 2)
    onehot = onehot.movedim(-1, 1).float()  # (B, 2 + G, D, H, W): [outside, body-only, groups...]
    body = (groups > 0).float().unsqueeze(1)
    flag = torch.ones_like(body)
    return torch.cat([onehot[:, 2:], body, flag], dim=1)
