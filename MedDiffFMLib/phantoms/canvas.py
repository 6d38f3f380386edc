"""The canvas: sample points of a grid in the anatomy frame, and painting with priorities.

The phantom lives in RAS millimetres; a grid only samples it. The anatomy frame is
dimensionless (``unit_mm`` per unit): ``U`` towards the patient's left, ``V`` posterior and
``T`` superior, rotated in-plane by the patient's pose and displaced by a smooth random
deformation. Every label decision is a closed-form test of a sample point's frame
position (or of an anatomy field, a function of that position), so a structure lands at
the same RAS place whatever the grid's spacing, orientation or extent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .. import anatomy
from . import fields as F

BODY = anatomy.BODY_LABEL
# Stand-in for body tissue that later shapes must not overwrite (spinal canal, pharynx air,
# perirenal fat, ...). Not a TotalSegmentator index; replaced by BODY at the end.
RESERVED = 254
_NAME_TO_LABEL = {name: value for value, name in anatomy.DEFAULT_LABEL_NAMES.items()}


def lab(name: str) -> int:
    """TotalSegmentator label value of a class name."""
    return _NAME_TO_LABEL[name]


@dataclass(frozen=True)
class Placement:
    """Where the anatomy frame sits in RAS.

    Attributes:
        origin_ras: (3,) RAS point (mm) where the frame has coordinates ``offset``.
        unit_mm: mm per frame unit.
        angle: in-plane rotation of the patient (rad).
        offset: (U, V, T) frame coordinates of ``origin_ras``.
    """

    origin_ras: tuple[float, float, float]
    unit_mm: float
    angle: float
    offset: tuple[float, float, float]


class Canvas:
    """Label and tissue arrays over a sample grid, with each sample's frame coordinates.

    Args:
        sample_to_ras: (4, 4) sample-index (i, j, k, 1) -> RAS matrix.
        shape: (k, j, i) sample counts.
        place: the frame's placement in RAS.
        deform: displacement std in frame units at the coarse and the fine scale (0: none).
        seed: phantom seed (keys of the deformation fields).
        stream: random stream of the anatomy fields.
        pattern_seed: seed of the anatomy fields (bowel loops, gas, vessel trees, gyri);
            default ``seed``.
    """

    DEFORM_CELLS = (0.6, 0.3)  # correlation lengths of the deformation, frame units
    COARSE_STEP = 4

    def __init__(self, sample_to_ras: np.ndarray, shape, place: Placement, deform=(0.0, 0.0), *,
                 seed: int, stream: int, pattern_seed: int | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.unit = float(place.unit_mm)
        m = np.asarray(sample_to_ras, np.float64)
        self.spacing = tuple(float(v) for v in np.linalg.norm(m[:3, :3], axis=0)[::-1])  # k, j, i
        c, s = math.cos(place.angle), math.sin(place.angle)
        # RAS -> (left, posterior, superior), then the in-plane pose rotation, then units.
        g = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([-1.0, -1.0, 1.0]) / self.unit
        a_ijk = g @ m[:3, :3]
        self.A = a_ijk[:, ::-1].copy()  # frame = A @ (k, j, i) + b
        self.b = g @ (m[:3, 3] - np.asarray(place.origin_ras, float)) + np.asarray(place.offset, float)
        self.A_inv = np.linalg.inv(self.A)
        self.seed, self.stream, self._counter = seed, stream, 0
        self.pattern_seed = seed if pattern_seed is None else pattern_seed
        kk, jj, ii = (np.arange(n, dtype=np.float32) for n in self.shape)
        U, V, T = (np.float32(self.A[r, 0]) * kk[:, None, None] + np.float32(self.A[r, 1]) * jj[None, :, None]
                   + (np.float32(self.A[r, 2]) * ii + np.float32(self.b[r]))[None, None, :] for r in range(3))
        self.dmax = 0.0
        if deform[0] > 0 or deform[1] > 0:
            dU, dV, dT = self._deformation(deform)
            U += dU
            V += dV
            T += dT
            self.dmax = float(max(np.abs(d).max() for d in (dU, dV, dT)))
        self.U, self.V, self.T = U, V, T
        self.t_lo, self.t_hi = float(T.min()), float(T.max())
        # A coarse copy of the coordinates tightens boxes (deformation and obliquity make the
        # affine bound loose); any sample lies within `_slack` frame units of a coarse one.
        st = self.COARSE_STEP
        self._cidx = [F.coarse_indices(0, n, st) for n in self.shape]  # every st-th sample and the last
        mesh = np.ix_(*self._cidx)
        self._coarse = tuple(c[mesh] for c in (U, V, T))
        self._slack = 1.4 * (st / 2) * math.sqrt(3.0) * max(self.spacing) / self.unit
        self.labels = np.zeros(self.shape, np.uint8)
        self.tissue = np.zeros(self.shape, np.uint8)
        self._luts: dict = {}

    # -- coordinates and fields ------------------------------------------------------------
    def undeformed(self, ik, ij, ii) -> np.ndarray:
        """(..., 3) undeformed frame points of an open mesh of sample indices."""
        idx = np.broadcast_arrays(ik, ij, ii)
        return np.stack([self.A[r, 0] * idx[0] + self.A[r, 1] * idx[1] + self.A[r, 2] * idx[2] + self.b[r]
                         for r in range(3)], axis=-1)

    def deformed(self, ik, ij, ii) -> np.ndarray:
        """(..., 3) frame points (deformed) of an open mesh of sample indices."""
        return np.stack([self.U[ik, ij, ii], self.V[ik, ij, ii], self.T[ik, ij, ii]], axis=-1)

    def steps(self, cell: float) -> tuple[int, int, int]:
        """Coarse sampling steps that put about three evaluations in a field cell."""
        return tuple(max(1, int(cell * self.unit / (3.0 * sp))) for sp in self.spacing)  # type: ignore

    def _key(self) -> tuple[int, int, int]:
        self._counter += 1
        return F.field_key(self.pattern_seed, self.stream, self._counter)

    def _deformation(self, amps):
        full = tuple(slice(0, n) for n in self.shape)
        step = self.steps(min(self.DEFORM_CELLS))
        out = []
        for comp in range(3):
            total = 0.0
            for scale, (cell, amp) in enumerate(zip(self.DEFORM_CELLS, amps)):
                key = F.field_key(self.seed, self.stream, 10 ** 6 + 2 * comp + scale)
                if amp > 0:
                    total = total + amp * F.field_on_grid(key, self.undeformed, cell, step, full)
            out.append(np.asarray(total, np.float32))
        return out

    def field(self, cell: float, sl=None) -> np.ndarray:
        """A unit-variance anatomy field with correlation ``cell`` (units) on the box ``sl``."""
        key = self._key()
        sl = sl or tuple(slice(0, n) for n in self.shape)
        return F.field_on_grid(key, self.deformed, cell, self.steps(cell), sl)

    def box(self, ulo, uhi, vlo, vhi, tlo, thi):
        """Slices (k, j, i) of the samples whose frame points may lie in a frame box, or None."""
        pad = self.dmax + 1e-6
        corners = np.array([[u, v, t] for u in (ulo - pad, uhi + pad) for v in (vlo - pad, vhi + pad)
                            for t in (tlo - pad, thi + pad)])
        idx = (corners - self.b) @ self.A_inv.T  # (8, 3) as (k, j, i)
        lo, hi = [], []
        for axis, n in enumerate(self.shape):
            a = max(0, int(math.ceil(idx[:, axis].min() - 1e-6)))
            b = min(n, int(math.floor(idx[:, axis].max() + 1e-6)) + 1)
            if b <= a:
                return None
            lo.append(a)
            hi.append(b)
        # Tighten with the coarse coordinates: every sample lies within `_slack` of a coarse
        # sample at most COARSE_STEP / 2 away along each axis, so only coarse hits count.
        st = self.COARSE_STEP
        c_lo = [int(np.searchsorted(ci, a - st // 2)) for ci, a in zip(self._cidx, lo)]
        c_hi = [int(np.searchsorted(ci, b - 1 + st // 2, side="right")) for ci, b in zip(self._cidx, hi)]
        csl = tuple(slice(cl, ch) for cl, ch in zip(c_lo, c_hi))
        cu, cv, ct = (c[csl] for c in self._coarse)
        e = self._slack
        hit = (cu > ulo - e) & (cu < uhi + e) & (cv > vlo - e) & (cv < vhi + e) & (ct > tlo - e) & (ct < thi + e)
        if not hit.any():
            return None
        for axis, axes in enumerate(((1, 2), (0, 2), (0, 1))):
            nz = np.flatnonzero(hit.any(axis=axes))
            ci = self._cidx[axis]
            lo[axis] = max(lo[axis], int(ci[c_lo[axis] + nz[0]]) - st // 2)
            hi[axis] = min(hi[axis], int(ci[c_lo[axis] + nz[-1]]) + st // 2 + 1)
        return tuple(slice(a, b) for a, b in zip(lo, hi))

    def full(self):
        return tuple(slice(0, n) for n in self.shape)

    def coords(self, sl):
        """(U, V, T) over the box ``sl``: three arrays of its shape (views)."""
        return self.U[sl], self.V[sl], self.T[sl]

    # -- painting --------------------------------------------------------------------------
    def _lut(self, over):
        key = None if over is None else frozenset(over)
        if key not in self._luts:
            lut = np.ones(256, bool) if key is None else np.zeros(256, bool)
            if key is not None:
                lut[list(key)] = True
            self._luts[key] = lut
        return self._luts[key]

    def paint(self, sl, mask, label, tissue, over=(BODY,)):
        """Set ``label``/``tissue`` where ``mask`` holds and the current label is in ``over``.

        The default ``over`` makes the first shape painted win: organs claim plain body
        tissue only, so painting order is priority order. ``label=None`` keeps labels.
        """
        if sl is None:
            return
        lab_ = self.labels[sl]
        ok = np.broadcast_to(mask, lab_.shape) & self._lut(over)[lab_]
        if label is not None:
            lab_[ok] = label
        if tissue is not None:
            self.tissue[sl][ok] = tissue

    def ellipsoid(self, centre, semi, angle=0.0, label=None, tissue=None, over=(BODY,), extra=None):
        """Paint an ellipsoid (semi-axes along the in-plane axes rotated by ``angle``, and T).

        ``extra(U, V, T, sl)`` may return a further mask to AND in. Returns the box and mask.
        """
        cu, cv, ct = centre
        a, b, h = semi
        r = max(a, b)
        sl = self.box(cu - r, cu + r, cv - r, cv + r, ct - h, ct + h)
        if sl is None:
            return None, None
        U, V, T = self.coords(sl)
        du, dv = U - cu, V - cv
        if angle:
            ca, sa = math.cos(angle), math.sin(angle)
            du, dv = ca * du + sa * dv, -sa * du + ca * dv
        mask = (du / a) ** 2 + (dv / b) ** 2 + ((T - ct) / h) ** 2 < 1.0
        if extra is not None:
            mask = mask & extra(U, V, T, sl)
        if tissue is not None or label is not None:
            self.paint(sl, mask, label, tissue, over)
        return sl, mask

    def tube(self, points, radii, label=None, tissue=None, over=(BODY,), extra=None):
        """Paint a tube along a polyline; ``radii`` per point, linearly interpolated.

        ``extra(U, V, T, sl)`` may return a further mask to AND in.
        """
        pts = np.asarray(points, float)
        rad = np.broadcast_to(np.asarray(radii, float), (len(pts),))
        # Long segments are cut into pieces a few radii long, so that each box hugs its piece.
        fine_pts, fine_rad = [pts[:1]], [rad[:1]]
        for a_, b_, ra_, rb_ in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
            n = max(1, int(np.ceil(np.linalg.norm(b_ - a_) / (4.0 * max(ra_, rb_, 1e-6)))))
            t = np.linspace(0.0, 1.0, n + 1)[1:, None]
            fine_pts.append(a_ + t * (b_ - a_))
            fine_rad.append(ra_ + t[:, 0] * (rb_ - ra_))
        pts_l = np.concatenate(fine_pts).tolist()  # python floats keep the arithmetic in float32
        rad_l = np.concatenate(fine_rad).tolist()
        for pa, pb, ra, rb in zip(pts_l[:-1], pts_l[1:], rad_l[:-1], rad_l[1:]):
            rm = max(ra, rb)
            lo = np.minimum(pa, pb) - rm
            hi = np.maximum(pa, pb) + rm
            sl = self.box(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
            if sl is None:
                continue
            U, V, T = self.coords(sl)
            d = [b_ - a_ for a_, b_ in zip(pa, pb)]
            dd = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]) or 1e-12
            s = np.clip(((U - pa[0]) * (d[0] / dd) + (V - pa[1]) * (d[1] / dd) + (T - pa[2]) * (d[2] / dd)), 0.0, 1.0)
            dist2 = (U - pa[0] - s * d[0]) ** 2 + (V - pa[1] - s * d[1]) ** 2 + (T - pa[2] - s * d[2]) ** 2
            mask = dist2 < (ra + s * (rb - ra)) ** 2
            if extra is not None:
                mask = mask & extra(U, V, T, sl)
            self.paint(sl, mask, label, tissue, over)

    def hollow_tube(self, points, radii, wall, label, wall_tissue, lumen_tissue, over=(BODY,), extra=None):
        """A tube whose outer ``wall`` (units) is ``wall_tissue`` and inside ``lumen_tissue``."""
        self.tube(points, radii, label, wall_tissue, over, extra)
        inner = np.maximum(np.asarray(radii, float) - wall, 1e-3)
        self.tube(points, inner, label, lumen_tissue, over=(label,), extra=extra)


# ---------------------------------------------------------------------------------------
# Shape helpers
# ---------------------------------------------------------------------------------------
def smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _superellipse_sum(U, V, a, b_ant, b_post):
    """``(|U/a|^p + |V/b|^p, posterior)`` with p = 2.4, b = b_post behind (V >= 0), and p = 2,
    b = b_ant in front; the powers are only taken where they are needed."""
    post = V >= 0
    au = np.abs(U) * np.float32(1.0 / a)
    av = np.abs(V) * np.where(post, np.float32(1.0 / b_post), np.float32(1.0 / b_ant))
    total = au * au + av * av
    pa = np.power(au, np.float32(2.4), out=np.zeros_like(au), where=post)
    np.power(av, np.float32(2.4), out=av, where=post)
    np.add(pa, av, out=total, where=post)
    return total, post


def superellipse_inside(U, V, a, b_ant, b_post):
    """Whether points lie inside the superellipse of :func:`superellipse_rho` (rho < 1)."""
    return _superellipse_sum(U, V, a, b_ant, b_post)[0] < 1.0


def superellipse_rho(U, V, a, b_ant, b_post):
    """Normalised radius of a superellipse (flatter posteriorly): 1 on the boundary.

    Homogeneous of degree one, so ``r * (1 / rho - 1)`` is the radial depth below it.
    """
    total, post = _superellipse_sum(U, V, a, b_ant, b_post)
    rho = np.sqrt(total)
    np.power(total, np.float32(1 / 2.4), out=rho, where=post)
    return rho


def bezier(p0, p1, p2, n=24):
    s = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - s) ** 2 * np.asarray(p0) + 2 * (1 - s) * s * np.asarray(p1) + s ** 2 * np.asarray(p2)


def polyline_dist2d(U, V, pts, reach: float = np.inf):
    """Distance from points (U, V) to a 2-D polyline, and which side (+1 left of travel).

    Points farther than ``reach`` from the polyline's bounding box get distance inf.
    """
    U, V = np.broadcast_arrays(U, V)
    best = np.full(U.shape, np.inf, np.float32)
    side = np.zeros(U.shape, np.float32)
    lo, hi = pts.min(axis=0) - reach, pts.max(axis=0) + reach
    near = np.flatnonzero(((U >= lo[0]) & (U <= hi[0]) & (V >= lo[1]) & (V <= hi[1])).ravel())
    u, v = U.ravel()[near], V.ravel()[near]
    b_near = np.full(near.size, np.inf, np.float32)
    s_near = np.zeros(near.size, np.float32)
    for a, b in zip(pts[:-1].tolist(), pts[1:].tolist()):
        d0, d1 = b[0] - a[0], b[1] - a[1]
        dd = d0 * d0 + d1 * d1
        s = np.clip((u - a[0]) * (d0 / dd) + (v - a[1]) * (d1 / dd), 0, 1)
        dist = np.hypot(u - a[0] - s * d0, v - a[1] - s * d1)
        closer = dist < b_near
        b_near[closer] = dist[closer]
        s_near[closer] = np.sign(d0 * (v[closer] - a[1]) - d1 * (u[closer] - a[0]))
    best.ravel()[near] = b_near
    side.ravel()[near] = s_near
    return best, side
