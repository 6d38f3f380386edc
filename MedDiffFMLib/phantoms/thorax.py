"""The thorax: rib cage, sternum, scapulae, clavicles and the lungs with their lobes."""

from __future__ import annotations

import math

import numpy as np

from .canvas import BODY, RESERVED, Canvas, lab, smoothstep
from .tissues import T_CANC, T_CARTILAGE, T_CORT, T_LUNG, T_MUSCLE


def cage_geometry():
    """Cage narrowing towards the thoracic inlet, and the posterolateral inset that leaves
    room for the scapulae and their muscles (both in trunk units)."""

    def g_top(T):  # the thoracic cage narrows towards the inlet
        return 1.0 - 0.42 * np.clip((T - 1.7) / 0.75, 0, 1) ** 2

    def inset(phin, T):
        w_s = np.exp(-((phin - 0.3) / 0.14) ** 2)
        w_c = smoothstep((T - 0.85) / 0.3)
        return 0.13 * w_s * w_c

    return g_top, inset


def paint_cage(cv: Canvas, p, rho_c, depth_c, t_T1, v_vb):
    bc = p["bc"]
    pT = p["pT"]
    g_top, inset = cage_geometry()
    # Candidate samples: a band inside the cavity boundary, below the thoracic inlet.
    band = (rho_c < 1.0) & (rho_c > 0.45) & (cv.T < t_T1 + 0.35)
    idx = np.flatnonzero(band)
    if idx.size == 0:
        return
    U = cv.U.ravel()[idx]
    V = cv.V.ravel()[idx]
    T = cv.T.ravel()[idx]
    r = np.hypot(U, V)
    rc = rho_c.ravel()[idx]
    phin = np.arctan2(np.abs(U), V) / math.pi  # 0 at the posterior midline, 1 anterior
    d_cage = g_top(T) * r / rc - r - inset(phin, T)  # depth below the cage surface
    d_cav = depth_c.ravel()[idx]
    labs = cv.labels.reshape(-1)
    tis = cv.tissue.reshape(-1)
    sub_l = labs[idx]
    sub_t = tis[idx]

    def put(mask, label, tissue):
        ok = mask & (sub_l == BODY)
        sub_l[ok] = label
        sub_t[ok] = tissue

    # Ribs: rib n leaves vertebra Tn posteriorly and drops about 3.5 levels towards the front.
    drop = 3.4 * pT * phin ** 1.4
    nf = (t_T1 - T - drop) / pT + 1.0
    n = np.rint(nf)
    dz = np.abs(nf - n) * pT
    hz = 0.045
    d0, hr = 0.04, 0.024
    bone_end = np.select([n <= 7, n <= 10, n == 11], [0.8, 0.74, 0.55], 0.42)
    cart_end = np.select([n <= 7, n <= 10], [0.985, 0.86], 0.0)
    in_rib = (n >= 1) & (n <= 12) & (dz < hz) & (np.abs(d_cage - d0) < hr) & (phin > 0.17)
    bone = in_rib & (phin < bone_end)
    core = (dz < 0.55 * hz) & (np.abs(d_cage - d0) < 0.5 * hr)
    side_left = U > 0
    for k in range(1, 13):
        sel = n == k
        put(bone & sel & side_left & core, lab(f"rib_left_{k}"), T_CANC)
        put(bone & sel & side_left, lab(f"rib_left_{k}"), T_CORT)
        put(bone & sel & ~side_left & core, lab(f"rib_right_{k}"), T_CANC)
        put(bone & sel & ~side_left, lab(f"rib_right_{k}"), T_CORT)
    put(in_rib & (phin >= bone_end) & (phin < cart_end), lab("costal_cartilages"), T_CARTILAGE)
    # Sternum: anterior midline plate, manubrium wider at the top.
    t_top = t_T1 - 1.3 * pT
    t_xi = t_T1 - 6 * pT - 3.4 * pT
    st_half = 0.085 + 0.05 * np.clip((T - t_top + 0.3) / 0.3, 0, 1)
    stern = (np.abs(U) < st_half) & (np.abs(d_cage - d0) < 0.03) & (phin > 0.9) & (T < t_top) & (T > t_xi)
    put(stern & (np.abs(d_cage - d0) < 0.015) & (np.abs(U) < st_half - 0.015), lab("sternum"), T_CANC)
    put(stern, lab("sternum"), T_CORT)
    # Scapulae: thin blades in the posterolateral muscle layer outside the ribs.
    scap = (phin > 0.17) & (phin < 0.42) & (T > 0.95) & (T < t_T1 + 0.1) & (d_cav > 0.02) & (d_cav < 0.045) & \
        (d_cage < -0.02)
    put(scap & (U > 0), lab("scapula_left"), T_CORT)
    put(scap & (U <= 0), lab("scapula_right"), T_CORT)
    # Muscle between the cavity boundary and the (inset or narrowed) cage.
    put((d_cage < 0.0) & (d_cav > 0), RESERVED, T_MUSCLE)
    labs[idx] = sub_l
    tis[idx] = sub_t
    # Rib necks: from the vertebral body to where the arc starts.
    for k in range(1, 13):
        tn = t_T1 - (k - 1) * pT
        if tn + 0.3 < cv.t_lo or tn - 0.3 > cv.t_hi:
            continue
        ph = 0.17
        for side, nm in ((1, "left"), (-1, "right")):
            ang = ph * math.pi
            rb = 1.0 / ((abs(math.sin(ang))) ** 2.4 + (abs(math.cos(ang)) / bc) ** 2.4) ** (1 / 2.4)
            g = float(g_top(np.array(tn)))
            rr = g * rb - d0 - float(inset(np.array(ph), np.array(tn)))
            end = (side * rr * math.sin(ang), rr * math.cos(ang), tn - 3.4 * pT * ph ** 1.4)
            cv.tube([(side * 0.13, v_vb + 0.06, tn), end], 0.028, lab(f"rib_{nm}_{k}"), T_CORT)
    # Clavicles at the top of the chest.
    t_cl = t_T1 - 0.05
    for side, nm in ((1, "left"), (-1, "right")):
        cv.tube([(0.1 * side, -bc + 0.04, t_cl), (0.5 * side, -bc + 0.06, t_cl + 0.15),
                 (0.88 * side, -0.25, t_cl + 0.22)], 0.038, lab(f"clavicula_{nm}"), T_CORT)


def paint_lungs(cv: Canvas, p, rho_c, t_diaph, hc, hsemi, ha, v_vb, t_car, t_T1):
    bc = p["bc"]
    g_top, inset = cage_geometry()
    t_apex = t_T1 + 0.22
    t_lo = cv.t_lo
    sl = cv.box(-1, 1, -bc, bc, max(t_lo, float(np.min(t_diaph(np.array([0.9]), np.array([0.8]))))), t_apex)
    if sl is None:
        return
    U, V, T = cv.coords(sl)
    r = np.hypot(U, V)
    rc = rho_c[sl]
    phin = np.arctan2(np.abs(U), V) / math.pi
    d_cage = g_top(T) * r / rc - r - inset(phin, T)
    pleura = (d_cage > 0.075) & (T > t_diaph(U, V) + 0.025) & (T < t_apex)
    # Apices: domes over each lung.
    apex = ((np.abs(U) - 0.42) / 0.46) ** 2 + ((V - 0.08) / 0.55) ** 2 + \
        (np.maximum(T - 1.45, 0) / (t_apex - 1.45)) ** 2 < 1
    pleura &= apex
    # Mediastinum: heart with pericardial fat, superior and posterior mediastinum, spine.
    du, dv = U - hc[0], V - hc[1]
    ca, sa = math.cos(ha), math.sin(ha)
    du, dv = ca * du + sa * dv, -sa * du + ca * dv
    med = (du / (hsemi[0] + 0.05)) ** 2 + (dv / (hsemi[1] + 0.05)) ** 2 + ((T - hc[2]) / (hsemi[2] + 0.05)) ** 2 < 1
    v_mid = (v_vb - 0.1 - bc) / 2
    half_ap = (v_vb - 0.1 + bc) / 2
    w_sup = 0.17 + 0.1 * np.exp(-((T - p["arch_t"] + 0.1) / 0.22) ** 2)
    med |= (T > hc[2]) & (((U - 0.03) / w_sup) ** 2 + ((V - v_mid) / half_ap) ** 2 < 1)
    med |= ((U - 0.04) / 0.22) ** 2 + ((V - (v_vb - 0.16)) / 0.17) ** 2 < 1
    med |= ((U / 0.26) ** 2 + ((V - v_vb - 0.05) / 0.25) ** 2 < 1)
    lung = pleura & ~med
    left = U > 0.02
    # Fissures: oblique (both sides, higher posteriorly) and horizontal (right).
    upper = T > 0.95 + 0.8 * V
    t_hor = t_car - 0.35
    for mask, name in ((lung & left & upper, "lung_upper_lobe_left"), (lung & left & ~upper, "lung_lower_lobe_left"),
                       (lung & ~left & upper & (T > t_hor), "lung_upper_lobe_right"),
                       (lung & ~left & upper & (T <= t_hor), "lung_middle_lobe_right"),
                       (lung & ~left & ~upper, "lung_lower_lobe_right")):
        cv.paint(sl, mask, lab(name), T_LUNG)

