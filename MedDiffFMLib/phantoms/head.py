"""Head and neck: scalp, skull, brain with ventricles, face, cervical spine and neck organs."""

from __future__ import annotations

import numpy as np

from .canvas import BODY, RESERVED, Canvas, lab
from .spine import paint_vertebra
from .tissues import (
    T_AIR, T_ARTERY, T_CARTILAGE, T_CORD, T_CORT, T_CSF, T_DIPLOE, T_EYE, T_FAT, T_GM, T_GUTWALL, T_LENS,
    T_MUSCLE, T_SKIN, T_TEETH, T_THYROID, T_VEIN, T_WM,
)


def build_head(cv: Canvas, p: dict) -> None:
    """Paint the head and neck (labels and tissues) on the canvas."""
    bh, ch, t_cr, sk, sc = p["bh"], p["ch"], p["t_cr"], p["skull"], p["scalp"]
    na, nb, nf = p["neck_a"], p["neck_b"], p["neck_fat"]
    t_lo = cv.t_lo
    v_n = 0.28  # neck centre (the neck sits behind the face)

    # -- body: head, face and neck ------------------------------------------------------------
    cv.ellipsoid((0, 0, t_cr), (1 + sc, bh + sc, ch + sc), 0.0, BODY, T_SKIN, over=(0,))
    cv.ellipsoid((0, 0, t_cr), (1 + sc - 0.012, bh + sc - 0.012, ch + sc - 0.012), 0.0, BODY, T_FAT)
    face_c, face_s = (0, -0.2, -0.35), (0.78, bh - 0.15, 0.55)
    cv.ellipsoid(face_c, face_s, 0.0, BODY, T_SKIN, over=(0,))
    cv.ellipsoid(face_c, (face_s[0] - 0.012, face_s[1] - 0.012, face_s[2] - 0.012), 0.0, BODY, T_FAT)
    cv.ellipsoid(face_c, (face_s[0] - 0.07, face_s[1] - 0.07, face_s[2] - 0.07), 0.0, BODY, T_MUSCLE)
    sl = cv.box(-na, na, v_n - nb, v_n + nb, t_lo - 0.1, 0.0)
    if sl is not None:
        U, V, T = cv.coords(sl)
        q = (U / na) ** 2 + ((V - v_n) / nb) ** 2
        widen = 1.0 + 0.25 * np.clip((T + 1.2) / -0.5, 0, 1)  # towards the shoulders
        q = q / widen ** 2
        cv.paint(sl, q < 1, BODY, T_SKIN, over=(0,))
        cv.paint(sl, q < (1 - 0.015 / na) ** 2, BODY, T_FAT)
        cv.paint(sl, (q < (1 - nf / na) ** 2) & (T < -0.1), BODY, T_MUSCLE)

    # -- skull, brain --------------------------------------------------------------------------------
    def t_base(V):  # floor of the cranial cavity: anterior, middle, posterior fossa
        return np.interp(V, [-2.0, -0.5, -0.32, 0.18, 0.38, 2.0], [0.14, 0.14, -0.18, -0.18, -0.42, -0.42])

    v_fm = 0.32
    fm_r = 0.15
    v_vb = 0.12

    def above_base(U, V, T):
        return T > t_base(V)

    # Orbits, eyes, nasal cavity and sinuses claim their space before the skull.
    v_eye = -(bh - 0.24)
    for side in (1, -1):
        ec = (0.33 * side, v_eye, 0.0)
        cv.ellipsoid((ec[0], ec[1] - 0.13, 0.0), (0.06, 0.035, 0.05), 0.0, RESERVED, T_LENS)
        cv.ellipsoid(ec, (0.16, 0.16, 0.15), 0.0, RESERVED, T_EYE)
        cv.ellipsoid((ec[0], ec[1] + 0.05, 0.0), (0.23, 0.27, 0.2), 0.0, RESERVED, T_FAT)
        cv.ellipsoid((ec[0], ec[1] + 0.08, 0.0), (0.28, 0.3, 0.25), 0.0, lab("skull"), T_CORT,
                     extra=lambda U, V, T, sl: V > v_eye - 0.05)
        cv.ellipsoid((0.3 * side, -(bh - 0.4), -0.28), (0.16, 0.2, 0.17), 0.0, RESERVED, T_AIR)
        cv.ellipsoid((0.3 * side, -(bh - 0.4), -0.28), (0.2, 0.24, 0.21), 0.0, lab("skull"), T_CORT)
    cv.ellipsoid((0, -(bh - 0.25), -0.22), (0.09, 0.34, 0.24), 0.0, RESERVED, T_AIR)
    cv.ellipsoid((0, -(bh - 0.25), -0.22), (0.13, 0.38, 0.28), 0.0, lab("skull"), T_CORT)

    # Brain tissue inside the inner table, above the skull base.
    inner = (1 - sk, bh - sk, ch - sk)
    sl = cv.box(-inner[0], inner[0], -inner[1], inner[1], t_cr - inner[2], t_cr + inner[2])
    if sl is not None:
        U, V, T = cv.coords(sl)
        q = np.sqrt((U / inner[0]) ** 2 + (V / inner[1]) ** 2 + ((T - t_cr) / inner[2]) ** 2)
        depth = (1 - q) * 0.95  # approximate depth below the inner table (units)
        cavity = (q < 1) & above_base(U, V, T)
        depth = np.minimum(depth, T - t_base(V))
        brain = lab("brain")
        cv.paint(sl, cavity, brain, T_WM)
        gyri = cv.field(0.07, sl)
        cortex = depth < p["csf"] + 0.09 + 0.03 * gyri
        cv.paint(sl, cavity & cortex, brain, T_GM, over=(brain,))
        cv.paint(sl, cavity & (depth < p["csf"] + 0.012 * np.maximum(gyri, 0)), brain, T_CSF, over=(brain,))
        # Cerebellum (posterior fossa) and deep grey matter.
        cv.paint(sl, cavity & (V > 0.3) & (T < t_cr - 0.32), brain, T_GM, over=(brain,))
    vs = p["vent"]
    for side in (1, -1):
        cv.ellipsoid((0.23 * side, -0.05, t_cr + 0.02), (0.1, 0.17, 0.11), 0.0, lab("brain"), T_GM, over=(lab("brain"),))
        cv.ellipsoid((0.1 * side, -0.05, t_cr + 0.13), (0.06 * vs, 0.38, 0.1 * vs), 0.15 * side, lab("brain"), T_CSF,
                     over=(lab("brain"),))
    cv.ellipsoid((0, 0.0, t_cr + 0.02), (0.018 * vs, 0.12, 0.08), 0.0, lab("brain"), T_CSF, over=(lab("brain"),))
    # Brainstem down through the foramen magnum (brain), continuing as the cord.
    cv.tube([(0, 0.05, t_cr - 0.1), (0, v_fm - 0.06, -0.3), (0, v_fm, -0.5)], [0.13, 0.1, 0.08], lab("brain"), T_WM)

    # Skull: cortical tables with diploe, the skull base as a plate below the cavity floor.
    outer = (1.0, bh, ch)
    sl = cv.box(-1, 1, -bh, bh, t_cr - ch, t_cr + ch)
    if sl is not None:
        U, V, T = cv.coords(sl)
        q = np.sqrt((U / outer[0]) ** 2 + (V / outer[1]) ** 2 + ((T - t_cr) / outer[2]) ** 2)
        hole = (np.hypot(U, V - v_fm) < fm_r) & (T < -0.25)
        shell = (q < 1) & (T > t_base(V) - 0.09) & ~hole
        mid = np.abs(q - (1 - 0.5 * sk / 0.95)) < 0.18 * sk
        cv.paint(sl, shell & mid, lab("skull"), T_DIPLOE)
        cv.paint(sl, shell, lab("skull"), T_CORT)

    # -- face: mandible, teeth, maxilla ------------------------------------------------------------
    sl = cv.box(-0.75, 0.75, -bh, 0.3, -0.85, -0.1)
    if sl is not None:
        U, V, T = cv.coords(sl)
        rr = np.hypot(U / 0.62, (V + 0.28) / (bh - 0.4))
        arch = (V < -0.2) & (np.abs(rr - 0.86) < 0.07)
        cv.paint(sl, arch & (T < -0.42) & (T > -0.56), lab("skull"), T_TEETH)
        cv.paint(sl, arch & (T <= -0.56) & (T > -0.8), lab("skull"), T_CORT)
        cv.paint(sl, arch & (T >= -0.42) & (T < -0.32), lab("skull"), T_CORT)
    for side in (1, -1):
        cv.tube([(0.52 * side, -0.2, -0.75), (0.6 * side, 0.02, -0.45), (0.62 * side, 0.02, -0.22)], 0.05,
                lab("skull"), T_CORT)

    # -- neck: cervical spine, airway, oesophagus, thyroid, vessels, muscles -----------------------
    pC = p["pC"]
    for n in range(1, 8):
        tc = -0.42 - (n - 0.5) * pC
        paint_vertebra(cv, f"vertebrae_C{n}", tc, pC, v_vb, 0.15, 0.11, 0.1, 0.2, 0.24, 0.062,
                        has_cord=True, has_body=n > 1)
    # cord between the foramen magnum and C1
    cv.tube([(0, v_fm, -0.5), (0, v_vb + 0.11 + 0.1 + 0.012, -0.45)], 0.062, lab("spinal_cord"), T_CORD)
    # Airway: nasopharynx, oropharynx, larynx (body tissue), trachea.
    airway = [(0, -(bh - 0.55), -0.22), (0, -0.12, -0.3), (0, -0.1, -0.62), (0, -0.2, -0.85), (0, -0.24, -1.0)]
    cv.tube(airway, [0.08, 0.09, 0.08, 0.07, 0.09], RESERVED, T_AIR)
    sl = cv.box(-0.2, 0.2, -0.45, 0.0, -0.95, -0.6)
    if sl is not None:
        U, V, T = cv.coords(sl)
        rr = np.hypot(U / 0.16, (V + 0.2) / 0.14)
        cv.paint(sl, (rr > 0.8) & (rr < 1.0), RESERVED, T_CARTILAGE)
    cv.hollow_tube([(0, -0.24, -0.98), (0, -0.24, t_lo - 0.2)], 0.11, 0.02, lab("trachea"), T_CARTILAGE, T_AIR)
    cv.tube([(0.03, v_vb - 0.11 - 0.07, -0.8), (0.04, v_vb - 0.11 - 0.07, t_lo - 0.2)], 0.065, lab("esophagus"),
            T_GUTWALL)
    ts = p["thyroid"]
    t_thy = -1.08
    for side in (1, -1):
        cv.ellipsoid((0.2 * side, -0.2, t_thy), (0.1 * ts, 0.11 * ts, 0.22 * ts), 0.0, lab("thyroid_gland"), T_THYROID)
    cv.ellipsoid((0, -0.36, t_thy - 0.08), (0.14, 0.045, 0.06), 0.0, lab("thyroid_gland"), T_THYROID)
    t_bif = p["t_bif"]
    for side, nm in ((1, "left"), (-1, "right")):
        cv.tube([(0.33 * side, -0.08, t_lo - 0.2), (0.33 * side, -0.06, t_bif)], 0.055,
                lab(f"common_carotid_artery_{nm}"), T_ARTERY)
        cv.tube([(0.33 * side, -0.06, t_bif), (0.3 * side, 0.02, -0.25), (0.25 * side, 0.0, -0.1)], 0.045,
                RESERVED, T_ARTERY)
        cv.tube([(0.47 * side, -0.02, t_lo - 0.2), (0.45 * side, 0.05, -0.5), (0.42 * side, 0.12, -0.2)], 0.07,
                RESERVED, T_VEIN)
        # sternocleidomastoid in a fat plane
        scm = [(0.6 * side, 0.32, -0.28), (0.52 * side, -0.12, -0.9), (0.22 * side, -0.45, -1.55)]
        cv.tube(scm, 0.13, BODY, T_FAT, extra=lambda U, V, T, sl: T < -0.15)
        cv.tube(scm, 0.095, BODY, T_MUSCLE, extra=lambda U, V, T, sl: T < -0.15)
        # posterior triangle fat
        cv.ellipsoid((0.48 * side, 0.4, -0.9), (0.14, 0.12, 0.4), 0.0, BODY, T_FAT)

