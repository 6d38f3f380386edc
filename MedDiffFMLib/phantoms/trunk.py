"""The trunk: one continuous model; the chest and the abdomen are two windows on it.

Body wall, spine, back and psoas muscles, pelvis, great vessels, airway, heart and the
abdominal organs; the rib cage and the lungs are in :mod:`.thorax`.
"""

from __future__ import annotations

import math

import numpy as np

from .canvas import (BODY, RESERVED, Canvas, bezier, lab, polyline_dist2d, smoothstep, superellipse_inside,
                     superellipse_rho)
from .spine import paint_vertebra
from .thorax import paint_cage, paint_lungs
from .tissues import (
    T_AIR, T_ARTERY, T_BOWEL, T_CANC, T_CARTILAGE, T_CORT, T_FAT, T_FLUID, T_GAS, T_GUTWALL, T_HEART_BLOOD,
    T_KIDNEY, T_LIVER, T_MUSCLE, T_MYO, T_PANCREAS, T_PORTAL, T_SKIN, T_SPLEEN, T_STOOL, T_VEIN,
)


def build_trunk(cv: Canvas, p: dict) -> None:
    """Paint the trunk (labels and tissues) on the canvas."""
    bc, m, f = p["bc"], p["m"], p["f"]
    t_lo, t_hi = cv.t_lo, cv.t_hi
    U3, V3, _ = cv.coords(cv.full())

    # -- body wall: skin, subcutaneous fat, muscle, cavity (prisms along the body axis) ------
    rho_c = np.maximum(superellipse_rho(U3, V3, 1.0, bc, bc), 1e-6)
    depth_c = np.hypot(U3, V3) * (1.0 / rho_c - 1.0)  # radial depth below the cavity boundary
    rim = 0.055  # deep muscle layer inside the cavity boundary (intercostals, transversus)
    inside = superellipse_inside(U3, V3, 1 + m + f, bc + m + 1.25 * f, bc + m + 0.6 * f)
    cv.labels[inside] = BODY
    cv.tissue[:] = T_AIR
    cv.tissue[inside] = T_SKIN
    cv.tissue[superellipse_inside(U3, V3, 1 + m + f - 0.012, bc + m + 1.25 * f - 0.012,
                                  bc + m + 0.6 * f - 0.012)] = T_FAT
    cv.tissue[superellipse_inside(U3, V3, 1 + m, bc + m, bc + m)] = T_MUSCLE
    cv.tissue[depth_c > rim] = T_FAT  # visceral / mediastinal fat by default
    del inside

    # -- landmarks --------------------------------------------------------------------------
    pT, pL, pC = p["pT"], p["pL"], p["pC"]
    vbs = p["vb_scale"]
    v_vb = bc - 0.45  # vertebral body centre
    t_dR = p["t_dR"]
    t_dL = t_dR - p["dL"]

    def t_diaph(U, V):
        dome = t_dR + (t_dL - t_dR) * smoothstep((U + 0.15) / 0.3)
        return dome - 0.9 * (np.abs(U) - 0.42) ** 2 - 1.0 * np.maximum(V + 0.1, 0) ** 2

    room = depth_c > rim  # room for organs: deeper than the muscle rim

    def below_diaph(U, V, T, sl):
        return room[sl] & (T < t_diaph(U, V) - 0.025)

    # -- spine --------------------------------------------------------------------------------
    t_T1 = 11.5 * pT
    levels = []  # (name, centre, pitch, kind)
    for n in range(1, 13):
        levels.append((f"vertebrae_T{n}", (12 - n + 0.5) * pT, pT, "T"))
    for n in range(1, 6):
        levels.append((f"vertebrae_L{n}", -(n - 0.5) * pL, pL, "L"))
    t_S1 = -5 * pL - 0.15
    levels.append(("vertebrae_S1", t_S1, 0.3, "S"))
    top = 12 * pT
    for n in range(7, 0, -1):
        levels.append((f"vertebrae_C{n}", top + (7 - n + 0.5) * pC, pC, "C"))
    t_conus = -1.6 * pL  # the cord ends near L1/L2; below, the canal holds CSF and roots
    for name, tc, pitch, kind in levels:
        if tc + pitch < t_lo or tc - pitch > t_hi:
            continue
        if kind == "C":
            a, b, cr, sp, tp = 0.1, 0.08, 0.075, 0.18, 0.2
        elif kind == "T":
            frac = tc / (12 * pT)  # 0 at T12 .. 1 at T1: thoracic bodies shrink upwards
            a, b, cr, sp, tp = 0.15 - 0.04 * frac, 0.125 - 0.03 * frac, 0.06, 0.26, 0.25
        else:
            a, b, cr, sp, tp = 0.18, 0.125, 0.075, 0.24, 0.33
        paint_vertebra(cv, name, tc, pitch, v_vb, a * vbs, b * vbs, cr, sp, tp, 0.035,
                        has_cord=tc > t_conus)
    # Sacrum: a plate below S1 that widens into the alae and tilts backwards.
    ts = t_S1 - 0.15
    if t_lo < ts:
        sl = cv.box(-0.4, 0.4, v_vb - 0.2, v_vb + 0.8, t_lo - 0.1, ts)
        if sl is not None:
            U, V, T = cv.coords(sl)
            depth = ts - T
            vc = v_vb + 0.05 + 0.45 * depth
            half_w = 0.34 - 0.25 * np.clip(depth / 1.0, 0, 1)
            q = (U / half_w) ** 2 + ((V - vc) / 0.11) ** 2
            cv.paint(sl, q < 0.75, lab("sacrum"), T_CANC)
            cv.paint(sl, q < 1.0, lab("sacrum"), T_CORT)

    # -- back and psoas muscles ---------------------------------------------------------------
    for side, nm in ((1, "left"), (-1, "right")):
        au = 0.2 * side
        sl = cv.box(au - 0.16, au + 0.16, v_vb + 0.15, v_vb + 0.45, t_lo, t_hi)
        if sl is not None:
            U, V, T = cv.coords(sl)
            mask = ((U - au) / 0.15) ** 2 + ((V - v_vb - 0.3) / 0.135) ** 2 < 1
            cv.paint(sl, mask & (T > t_S1 - 0.2), lab(f"autochthon_{nm}"), T_MUSCLE)
        pts = [(0.14 * side, v_vb - 0.02, 0.12), (0.2 * side, v_vb, -0.3), (0.26 * side, v_vb, -0.8),
               (0.32 * side, v_vb - 0.05, -1.3), (0.4 * side, v_vb - 0.2, -1.8), (0.45 * side, v_vb - 0.3, -2.4)]
        cv.tube(pts, [0.02, 0.07, 0.11, 0.13, 0.12, 0.11], lab(f"iliopsoas_{nm}"), T_MUSCLE)

    # -- rib cage, sternum, scapulae, clavicles -----------------------------------------------
    paint_cage(cv, p, rho_c, depth_c, t_T1, v_vb)

    # Posterior abdominal wall (quadratus lumborum) below the diaphragm: keeps organs in front.
    sl = cv.box(-0.8, 0.8, v_vb + 0.1, bc, t_lo, t_hi)
    if sl is not None:
        U, V, T = cv.coords(sl)
        mask = (V > v_vb + 0.16) & below_diaph(U, V, T, sl) & (np.abs(U) > 0.3)
        cv.paint(sl, mask, RESERVED, T_MUSCLE)

    # -- pelvis: iliac wings with iliacus inside and gluteus medius outside -------------------
    t_crest = p["crest_t"]
    if t_lo < t_crest:
        for side, nm in ((1, "left"), (-1, "right")):
            pts = bezier((0.24 * side, v_vb + 0.22), (0.72 * side, v_vb + 0.2), (0.86 * side, -0.25), n=14)
            lo, hi = pts.min(axis=0) - 0.18, pts.max(axis=0) + 0.18
            sl = cv.box(lo[0], hi[0], lo[1], hi[1], t_lo, t_crest)
            if sl is None:
                continue
            U, V, T = cv.coords(sl)
            d2, s2 = polyline_dist2d(U, V, pts, reach=0.18)
            s2 = s2 * side  # +1 towards the body centre for both sides
            # The wing tapers towards the crest.
            thick = 0.035 * np.clip((t_crest - T) / 0.15, 0.4, 1.0)
            cv.paint(sl, d2 < 0.5 * thick, lab(f"hip_{nm}"), T_CANC)
            cv.paint(sl, d2 < thick, lab(f"hip_{nm}"), T_CORT)
            cv.paint(sl, (d2 < 0.1) & (s2 < 0), lab(f"iliopsoas_{nm}"), T_MUSCLE)
            cv.paint(sl, (d2 < 0.17) & (s2 > 0) & (T < t_crest - 0.03), lab(f"gluteus_medius_{nm}"), T_MUSCLE)

    # -- great vessels -----------------------------------------------------------------------------
    hs = p["heart_scale"]
    t_hc = t_dL + 0.36 * hs  # heart centre
    t_ht = t_hc + 0.36 * hs  # heart base
    as_ = p["aorta_scale"]
    arch_t = p["arch_t"]
    v_desc = v_vb - 0.17
    asc = np.array([0.0, -0.24, arch_t - 0.2])
    desc = np.array([0.17, v_desc, arch_t - 0.2])
    mid = (asc + desc) / 2
    arch = [mid + math.cos(th) * (asc - mid) + np.array([0, 0, 0.2 * math.sin(th)])
            for th in np.linspace(0, math.pi, 9)]
    t_bif = p["t_bif"]
    aorta = ([(0.04, -0.22, t_hc)] + arch +
             [(0.15, v_desc - 0.02, 1.0), (0.1, v_vb - 0.2, 0.2), (0.05, v_vb - 0.23, -0.4), (0.04, v_vb - 0.23, t_bif)])
    arad = [0.11] * 3 + [0.1] * 7 + [0.08, 0.07, 0.065, 0.06]
    cv.tube(aorta, np.array(arad) * as_, lab("aorta"), T_ARTERY)
    for side, nm in ((1, "left"), (-1, "right")):
        cv.tube([(0.04 * side, v_vb - 0.23, t_bif + 0.02), (0.28 * side, v_vb - 0.18, t_bif - 0.45),
                 (0.42 * side, v_vb - 0.3, t_bif - 1.0)], 0.045 * as_, lab(f"iliac_artery_{nm}"), T_ARTERY)
        cv.tube([(0.05 * side - 0.12, v_vb - 0.1, t_bif - 0.05), (0.24 * side, v_vb - 0.08, t_bif - 0.45),
                 (0.38 * side, v_vb - 0.2, t_bif - 1.0)], 0.05, lab(f"iliac_vena_{nm}"), T_VEIN)
    # Arch branches up to the thoracic inlet.
    top_t = arch_t + 0.9
    cv.tube([(0.0, -0.2, arch_t - 0.02), (-0.1, -0.16, arch_t + 0.22)], 0.045, lab("brachiocephalic_trunk"), T_ARTERY)
    cv.tube([(-0.1, -0.16, arch_t + 0.22), (-0.14, -0.12, top_t)], 0.035, lab("common_carotid_artery_right"), T_ARTERY)
    cv.tube([(-0.1, -0.16, arch_t + 0.22), (-0.35, -0.08, arch_t + 0.35), (-0.7, -0.1, arch_t + 0.4)], 0.035,
            lab("subclavian_artery_right"), T_ARTERY)
    cv.tube([(0.07, -0.14, arch_t), (0.13, -0.12, top_t)], 0.035, lab("common_carotid_artery_left"), T_ARTERY)
    cv.tube([(0.13, -0.04, arch_t - 0.02), (0.22, -0.02, arch_t + 0.25), (0.5, -0.05, arch_t + 0.4),
             (0.75, -0.1, arch_t + 0.42)], 0.037, lab("subclavian_artery_left"), T_ARTERY)
    # Veins: SVC, brachiocephalic veins, IVC.
    cv.tube([(-0.16, -0.17, t_ht - 0.05), (-0.16, -0.17, arch_t + 0.2)], 0.055, lab("superior_vena_cava"), T_VEIN)
    cv.tube([(-0.16, -0.18, arch_t + 0.2), (0.1, -0.28, arch_t + 0.3), (0.45, -0.25, arch_t + 0.4)], 0.04,
            lab("brachiocephalic_vein_left"), T_VEIN)
    cv.tube([(-0.16, -0.17, arch_t + 0.2), (-0.3, -0.15, arch_t + 0.45), (-0.5, -0.12, arch_t + 0.55)], 0.045,
            lab("brachiocephalic_vein_right"), T_VEIN)
    cv.tube([(-0.1, -0.08, t_hc - 0.05), (-0.15, v_vb - 0.14, t_dR - 0.3), (-0.14, v_vb - 0.16, -0.4),
             (-0.12, v_vb - 0.13, t_bif - 0.05)], [0.07, 0.08, 0.075, 0.07], lab("inferior_vena_cava"), T_VEIN)

    # -- airway and oesophagus -----------------------------------------------------------------
    t_car = 1.45
    trachea = [(0.0, v_vb - 0.3, t_hi + 0.2), (0.0, v_vb - 0.3, t_car)]
    cv.hollow_tube(trachea, 0.075, 0.014, lab("trachea"), T_CARTILAGE, T_AIR)
    cv.hollow_tube([(0.0, v_vb - 0.3, t_car), (-0.24, v_vb - 0.24, t_car - 0.18)], 0.05, 0.01, lab("trachea"), T_GUTWALL, T_AIR)
    cv.hollow_tube([(0.0, v_vb - 0.3, t_car), (0.27, v_vb - 0.21, t_car - 0.26)], 0.045, 0.01, lab("trachea"), T_GUTWALL, T_AIR)
    eso = [(0.02, v_vb - 0.175, t_hi + 0.2), (0.03, v_vb - 0.18, 0.9), (0.12, v_vb - 0.25, t_dL - 0.02),
           (0.3, -0.02, t_dL - 0.15)]
    cv.tube(eso, 0.045, lab("esophagus"), T_GUTWALL)

    # -- heart ---------------------------------------------------------------------------------------
    hc = (p["heart_u"], -0.2 + p["heart_dv"], t_hc)
    hsemi = (0.5 * hs, 0.34 * hs, 0.4 * hs)
    ha = p["heart_angle"]

    def above_diaph(U, V, T, sl):
        return T > t_diaph(U, V) + 0.02

    cv.ellipsoid(hc, (0.72 * hsemi[0], 0.65 * hsemi[1], 0.72 * hsemi[2]), ha, lab("heart"), T_HEART_BLOOD,
                 extra=above_diaph)
    cv.ellipsoid(hc, hsemi, ha, lab("heart"), T_MYO, extra=above_diaph)
    # Pulmonary trunk and arteries (no TotalSegmentator class: body tissue).
    cv.tube([(0.12, -0.36, t_ht - 0.1), (0.08, -0.22, t_car - 0.12), (0.3, -0.06, t_car - 0.1)], 0.07, RESERVED, T_VEIN)
    cv.tube([(0.08, -0.22, t_car - 0.12), (-0.3, -0.1, t_car - 0.2)], 0.06, RESERVED, T_VEIN)

    # -- abdominal organs (priority = painting order) --------------------------------------------
    ks = p["kidney_scale"]
    t_kL = -0.32 + p["kidney_dt"]
    for side, nm, tk in ((1, "left", t_kL), (-1, "right", t_kL - p["kidney_r_lower"])):
        kc = (0.42 * side + p["kidney_du"], v_vb + 0.02, tk)
        ang = side * 0.6
        # renal sinus fat first (reserved) so that the kidney becomes a bean
        off = 0.11
        sc = (kc[0] - side * off * math.cos(0.6), kc[1] - off * math.sin(0.6), tk)
        cv.ellipsoid(sc, (0.07 * ks, 0.055 * ks, 0.17 * ks), ang, RESERVED, T_FAT, extra=below_diaph)
        cv.ellipsoid(kc, (0.19 * ks, 0.125 * ks, 0.36 * ks), ang, lab(f"kidney_{nm}"), T_KIDNEY, extra=below_diaph)
        cv.ellipsoid(kc, (0.24 * ks, 0.17 * ks, 0.41 * ks), ang, RESERVED, T_FAT, extra=below_diaph)
    # Portal and splenic vein, then pancreas along it.
    t_pv = -0.32
    cv.tube([(0.5, 0.18, t_pv + 0.2), (0.2, -0.05, t_pv + 0.05), (0.0, -0.15, t_pv), (-0.22, -0.12, t_pv + 0.3),
             (-0.35, -0.05, t_pv + 0.45)], 0.04, lab("portal_vein_and_splenic_vein"), T_PORTAL, extra=below_diaph)
    cv.tube([(-0.17, -0.14, t_pv - 0.12), (0.0, -0.23, t_pv + 0.02), (0.25, -0.14, t_pv + 0.12),
             (0.48, 0.12, t_pv + 0.22)], [0.1, 0.07, 0.065, 0.05], lab("pancreas"), T_PANCREAS, extra=below_diaph)
    # Gallbladder under the liver.
    gs = p["gall"]
    cv.ellipsoid((-0.36, -0.42, t_dR - 0.78), (0.08 * gs, 0.09 * gs, 0.16 * gs), 0.3, lab("gallbladder"), T_FLUID,
                 extra=below_diaph)
    # Liver: right lobe + left lobe, clipped by the diaphragm and the rim.
    ls = p["liver_scale"]
    du, dv = p["liver_du"], p["liver_dv"]
    for c, s in (((-0.4 + du, -0.04 + dv, t_dR - 0.42 * ls), (0.62 * ls, 0.66 * ls, 0.56 * ls)),
                 ((0.12 + du, -0.36 + dv, t_dR - 0.2 * ls), (0.4 * ls, 0.22 * ls, 0.2 * ls))):
        cv.ellipsoid(c, s, 0.0, lab("liver"), T_LIVER, extra=below_diaph)
    # Spleen along the left posterolateral wall.
    ss = p["spleen_scale"]
    spc = (0.62, 0.3, t_dL - 0.36 + p["spleen_dt"])
    cv.ellipsoid(spc, (0.13 * ss, 0.27 * ss, 0.24 * ss), math.atan2(spc[1], spc[0]), lab("spleen"), T_SPLEEN,
                 extra=below_diaph)
    # Stomach: J-shaped tube from the fundus to the pylorus; gas above a fluid level.
    st = p["stomach_scale"]
    sp = [(0.42, 0.08, t_dL - 0.12), (0.44, -0.16, t_dL - 0.38), (0.3, -0.4, t_dL - 0.66),
          (0.02, -0.46, t_dL - 0.76), (-0.15, -0.36, t_dL - 0.72)]
    srad = np.array([0.2, 0.19, 0.15, 0.1, 0.06]) * st
    cv.hollow_tube(sp, srad, 0.025, lab("stomach"), T_GUTWALL, T_FLUID, extra=below_diaph)
    lvl = p["stomach_level"]
    cv.tube(sp, srad - 0.025, None, T_GAS, over=(lab("stomach"),), extra=lambda U, V, T, sl: V < lvl)
    # Duodenum: C-loop around the pancreatic head.
    duo = [(-0.15, -0.36, t_dL - 0.72), (-0.3, -0.24, t_pv - 0.02), (-0.33, -0.08, t_pv - 0.3),
           (-0.18, -0.1, t_pv - 0.5), (0.12, -0.14, t_pv - 0.5), (0.2, -0.22, t_pv - 0.25)]
    cv.hollow_tube(duo, 0.065, 0.02, lab("duodenum"), T_GUTWALL, T_FLUID, extra=below_diaph)
    # Colon frame: ascending, transverse, descending, sigmoid.
    cr = p["colon_r"]
    colon = [(-0.7, -0.08, -2.4), (-0.7, -0.08, -1.1), (-0.68, -0.14, -0.62), (-0.55, -0.34, -0.45),
             (-0.25, -0.5, -0.62), (0.1, -0.52, -0.72), (0.45, -0.38, -0.42), (0.7, -0.08, -0.22),
             (0.74, 0.0, -0.7), (0.7, -0.02, -1.3), (0.5, -0.3, -1.75), (0.1, -0.2, -2.0), (0.0, 0.2, -2.5)]
    cv.hollow_tube(colon, cr, 0.018, lab("colon"), T_GUTWALL, T_STOOL, extra=below_diaph)
    bbox = cv.box(-1, 1, -bc, bc, t_lo, min(t_hi, 0.2))
    if bbox is not None:
        # Gas pockets replace stool inside the lumen only (the wall stays).
        gas = cv.field(0.12, bbox) > p["colon_gas"]
        sub_t = cv.tissue[bbox]
        sub_t[gas & (sub_t == T_STOOL)] = T_GAS
    # Small bowel: convoluted loops from two smooth fields, in the mid/lower abdomen.
    sb = cv.box(-0.9, 0.9, -bc, v_vb, max(t_lo, -2.3), min(t_hi, -0.3))
    if sb is not None:
        U, V, T = cv.coords(sb)
        f1 = cv.field(0.16, sb)
        f2 = cv.field(0.16, sb)
        r2f = f1 * f1 + f2 * f2
        w2 = 1.6 * p["bowel_fill"]
        zone = below_diaph(U, V, T, sb) & (V < v_vb - 0.05) & (T < -0.3 - 0.2 * np.clip(U + 0.2, 0, 1))
        cv.paint(sb, zone & (r2f < w2), lab("small_bowel"), T_GUTWALL)
        cv.paint(sb, zone & (r2f < 0.45 * w2), lab("small_bowel"), T_BOWEL, over=(lab("small_bowel"),))

    # -- lungs --------------------------------------------------------------------------------------
    paint_lungs(cv, p, rho_c, t_diaph, hc, hsemi, ha, v_vb, t_car, t_T1)

