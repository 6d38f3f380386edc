"""Tissues (what a sample point is made of) and their HU per contrast phase.

Labels say which organ a point belongs to; tissues drive its HU. A tissue's mean HU depends
on the phantom's seed-drawn parameters and on its contrast phase; its texture amplitude at
each of three scales is fixed per tissue and scaled per phantom.
"""

from __future__ import annotations

import numpy as np

(T_NONE, T_AIR, T_LUNG, T_FAT, T_MUSCLE, T_SKIN, T_ARTERY, T_VEIN, T_MYO, T_HEART_BLOOD,
 T_LIVER, T_SPLEEN, T_KIDNEY, T_PANCREAS, T_GUTWALL, T_FLUID, T_STOOL, T_BOWEL, T_CANC,
 T_CORT, T_DISC, T_CARTILAGE, T_CSF, T_GM, T_WM, T_CORD, T_THYROID, T_EYE, T_LENS, T_TEETH,
 T_DIPLOE, T_GAS, T_PORTAL) = range(33)
N_TISSUES = 33

# Contrast phases: no iodine, late arterial (~35 s) and portal venous (~70 s).
PHASES = ("native", "arterial", "portal_venous")

# Texture amplitude (HU) per tissue at the coarse, medium and fine scales.
TEXTURE = np.zeros((N_TISSUES, 3), np.float32)
TEXTURE[:] = (3.0, 2.5, 2.5)
for _t, _amp in {
    T_NONE: (0, 0, 0), T_AIR: (0, 0, 0), T_GAS: (0, 0, 0), T_LUNG: (18, 10, 10), T_FAT: (6, 5, 5),
    T_MUSCLE: (5, 3, 3), T_LIVER: (4, 3, 2.5), T_SPLEEN: (4, 3, 2.5), T_KIDNEY: (4, 3, 2.5),
    T_PANCREAS: (6, 7, 6), T_GUTWALL: (4, 3, 3), T_FLUID: (2, 1.5, 1.5), T_STOOL: (60, 80, 80),
    T_BOWEL: (12, 9, 9), T_CANC: (45, 45, 45), T_CORT: (60, 45, 45), T_DIPLOE: (80, 60, 60),
    T_GM: (1.5, 1.2, 1.2), T_WM: (1.5, 1.2, 1.2), T_CSF: (1, 0.8, 0.8), T_TEETH: (80, 45, 45),
    T_ARTERY: (3, 1.5, 1.5), T_VEIN: (3, 1.5, 1.5), T_PORTAL: (3, 1.5, 1.5), T_HEART_BLOOD: (3, 1.5, 1.5),
}.items():
    TEXTURE[_t] = _amp

# Enhancement per phase: (arterial blood HU range, fraction of the arterial enhancement seen in
# systemic veins, in the portal system, in the heart chambers) and organ enhancement in HU.
_PHASE_BLOOD = {
    "native": ((40.0, 40.0), 1.0, 1.0, 1.0),
    "arterial": ((250.0, 400.0), 0.25, 0.45, 0.8),
    "portal_venous": ((140.0, 210.0), 0.9, 1.0, 0.95),
}
_ORGAN_GAIN = {  # HU added to the native value: myocardium, liver, spleen, pancreas, gut wall, thyroid
    "native": dict(myo=0, liver=0, spleen=0, pancreas=0, gut=0, thyroid=0),
    "arterial": dict(myo=70, liver=12, spleen=60, pancreas=75, gut=40, thyroid=80),
    "portal_venous": dict(myo=55, liver=55, spleen=65, pancreas=45, gut=30, thyroid=60),
}


def arterial_hu(p: dict) -> float:
    """Arterial blood HU of a phantom: ``p["phase"]`` and its draw ``p["blood_u"]`` in [0, 1]."""
    lo, hi = _PHASE_BLOOD[p["phase"]][0]
    return lo + (hi - lo) * p["blood_u"]


def tissue_hu(p: dict) -> np.ndarray:
    """Mean HU per tissue for one phantom (seed-drawn values and its contrast phase).

    Returns:
        (N_TISSUES,) float32.
    """
    phase = p["phase"]
    art = arterial_hu(p)
    _, f_vein, f_portal, f_heart = _PHASE_BLOOD[phase]
    gain = _ORGAN_GAIN[phase]
    hu = np.zeros(N_TISSUES, np.float32)
    hu[[T_NONE, T_AIR, T_GAS]] = -1000
    hu[T_LUNG] = p["hu_lung"]
    hu[T_FAT] = p["hu_fat"]
    hu[T_MUSCLE] = p["hu_muscle"]
    hu[T_SKIN] = 30
    hu[T_ARTERY] = art
    hu[T_VEIN] = 40 + f_vein * (art - 40)
    hu[T_PORTAL] = 40 + f_portal * (art - 40)
    hu[T_HEART_BLOOD] = 40 + f_heart * (art - 40)
    hu[T_MYO] = 45 + gain["myo"]
    hu[T_LIVER] = p["hu_liver"] + gain["liver"]
    hu[T_SPLEEN] = p["hu_spleen"] + gain["spleen"]
    # kidneys: corticomedullary in the arterial phase, nephrographic in the portal venous phase
    hu[T_KIDNEY] = {"native": 35.0, "arterial": 35 + 0.45 * (art - 40), "portal_venous": 35 + 0.8 * (art - 40)}[phase]
    hu[T_PANCREAS] = 45 + gain["pancreas"]
    hu[T_GUTWALL] = 40 + gain["gut"]
    hu[T_FLUID] = 12
    hu[T_STOOL] = -140
    hu[T_BOWEL] = 22
    hu[T_CANC] = p["hu_canc"]
    hu[T_CORT] = p["hu_cort"]
    hu[T_DIPLOE] = 0.55 * p["hu_cort"]
    hu[T_TEETH] = 1800
    hu[T_DISC] = 85
    hu[T_CARTILAGE] = 120
    hu[T_CSF] = 8
    hu[T_GM] = p["hu_gm"]
    hu[T_WM] = p["hu_gm"] - 10
    hu[T_CORD] = 35
    hu[T_THYROID] = 100 + gain["thyroid"]
    hu[T_EYE] = 10
    hu[T_LENS] = 90
    return hu
