"""The spine: one vertebra with its canal, body, arch and processes (trunk and neck)."""

from __future__ import annotations

import numpy as np

from .canvas import RESERVED, Canvas, lab
from .tissues import T_CANC, T_CORD, T_CORT, T_CSF, T_DISC, T_FAT


def paint_vertebra(cv: Canvas, name: str, tc: float, pitch: float, v_vb: float, a: float, b: float,
                    canal_r: float, sp_len: float, tp_len: float, cord_r: float, has_cord: bool,
                    has_body: bool = True):
    """One vertebra: canal (cord, CSF), body with cortex, arch, processes, discs."""
    label = lab(name)
    v_canal = v_vb + b + canal_r + 0.012
    sl = cv.box(-max(tp_len, a) - 0.02, max(tp_len, a) + 0.02, v_vb - b - 0.02,
                v_canal + canal_r + sp_len + 0.02, tc - 0.5 * pitch, tc + 0.5 * pitch)
    if sl is None:
        return
    U, V, T = cv.coords(sl)
    dt = np.abs(T - tc)
    # Spinal canal first (reserved), so that bone never fills it.
    rc = np.hypot(U / 1.15, V - v_canal)
    canal = rc < canal_r
    if has_cord:
        cv.paint(sl, rc < cord_r, lab("spinal_cord"), T_CORD)
    cv.paint(sl, canal & (rc < 0.75 * canal_r), RESERVED, T_CSF)
    cv.paint(sl, canal, RESERVED, T_FAT)  # epidural fat
    # Vertebral body: elliptic cylinder with a cortical shell; discs between bodies.
    q = (U / a) ** 2 + ((V - v_vb) / b) ** 2
    if has_body:
        cv.paint(sl, (q < 0.82) & (dt < 0.40 * pitch), label, T_CANC)
        cv.paint(sl, (q < 1.0) & (dt < 0.42 * pitch), label, T_CORT)
        cv.paint(sl, (q < 1.0) & (dt >= 0.42 * pitch), RESERVED, T_DISC)
    # Arch (pedicles + laminae) around the canal, then processes.
    post = dt < 0.33 * pitch
    cv.paint(sl, (rc >= canal_r) & (rc < canal_r + 0.045) & post, label, T_CORT)
    spin = (np.abs(U) < 0.028) & (V > v_canal) & (V < v_canal + canal_r + sp_len) & \
        (np.abs(T - tc + 0.15 * pitch) < 0.3 * pitch)
    cv.paint(sl, spin, label, T_CORT)
    trans = (np.abs(V - v_canal + 0.01) < 0.035) & (np.abs(U) < tp_len) & (dt < 0.2 * pitch)
    cv.paint(sl, trans, label, T_CORT)

