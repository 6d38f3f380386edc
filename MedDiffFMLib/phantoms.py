"""Seedable synthetic CT phantoms of the head and neck, the chest and the abdomen.

The phantoms feed the tests, the demo, CPU training of small models and the benchmarks
(denoising, anomaly detection, super-resolution, lesion generation). Each one is a CT-like
image in Hounsfield units with a TotalSegmentator-style label map, built from simple
analytic shapes (ellipsoids, tubes, superellipse layers, sloping rib arcs) and smooth
random fields, all vectorised numpy.

Geometry
--------
Arrays are indexed ``(k, j, i) = (z, y, x)``. Anatomy is laid out on the array axes as in an
axial DICOM series: ``i`` runs towards the patient's left, ``j`` towards posterior and ``k``
towards superior. The default ``ijk_to_ras`` says exactly that (direction columns
``-x, -y, +z`` in RAS, i.e. the identity direction of DICOM's LPS frame) and puts the centre
of the volume at RAS (0, 0, 0). A matrix passed by the caller is used as given; the image
content does not depend on it.

Anatomy lives in a normalised body frame whose unit is a fixed fraction of the body width,
and the body is scaled to fill ``fov_fill`` of the in-plane field of view (shape x spacing).
Every label decision is a closed-form test of a voxel centre's position in that frame (or a
smooth random field defined on a lattice in mm over the field of view), so the same seed on
two grids that cover the same field of view gives the same anatomy, whatever the voxel size.

Randomness comes from independent streams of ``numpy.random.default_rng([seed, stream])``:
anatomy parameters, label-relevant random fields, texture, lesions and noise. The same
arguments always give bit-identical output.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from . import anatomy
from .volume import Volume

__all__ = [
    "REGIONS",
    "Phantom",
    "Lesion",
    "make_phantom",
    "add_ct_noise",
    "insert_lesions",
    "default_ijk_to_ras",
    "LESION_ORGANS",
]

REGIONS = ("head_neck", "chest", "abdomen")

BODY = anatomy.BODY_LABEL
# Internal stand-in for body tissue that later shapes must not overwrite (spinal canal,
# pharynx air, perirenal fat, ...). Not a TotalSegmentator index; replaced by BODY at the end.
_RESERVED = 254
_NAME_TO_LABEL = {name: value for value, name in anatomy.DEFAULT_LABEL_NAMES.items()}

# Organs that receive lesions by default, per region (TotalSegmentator names).
LESION_ORGANS: dict[str, tuple[str, ...]] = {
    "abdomen": ("liver", "spleen", "kidney_left", "kidney_right"),
    "chest": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
              "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "head_neck": ("brain", "thyroid_gland"),
}
_LUNG_NAMES = frozenset(LESION_ORGANS["chest"])


def _lab(name: str) -> int:
    return _NAME_TO_LABEL[name]


# ---------------------------------------------------------------------------------------
# Tissues: what a voxel is made of (drives HU); labels say which organ it belongs to.
# ---------------------------------------------------------------------------------------
(T_NONE, T_AIR, T_LUNG, T_FAT, T_MUSCLE, T_SKIN, T_ARTERY, T_VEIN, T_MYO, T_HEART_BLOOD,
 T_LIVER, T_SPLEEN, T_KIDNEY, T_PANCREAS, T_GUTWALL, T_FLUID, T_STOOL, T_BOWEL, T_CANC,
 T_CORT, T_DISC, T_CARTILAGE, T_CSF, T_GM, T_WM, T_CORD, T_THYROID, T_EYE, T_LENS, T_TEETH,
 T_DIPLOE, T_GAS) = range(32)
_N_TISSUES = 32

# Low-frequency (coarse) and fine texture amplitude per tissue, HU.
_TEXTURE = np.zeros((_N_TISSUES, 2), np.float32)
_TEXTURE[:] = (3.0, 3.0)
for _t, _amp in {
    T_NONE: (0, 0), T_AIR: (0, 0), T_GAS: (0, 0), T_LUNG: (18, 12), T_FAT: (6, 7), T_MUSCLE: (5, 4),
    T_LIVER: (4, 3), T_SPLEEN: (4, 3), T_KIDNEY: (4, 3), T_PANCREAS: (6, 9), T_GUTWALL: (4, 4),
    T_FLUID: (2, 2), T_STOOL: (60, 110), T_BOWEL: (12, 12), T_CANC: (45, 60), T_CORT: (60, 60),
    T_DIPLOE: (80, 80), T_GM: (1.5, 1.5), T_WM: (1.5, 1.5), T_CSF: (1, 1), T_TEETH: (80, 60),
    T_ARTERY: (3, 2), T_VEIN: (3, 2), T_HEART_BLOOD: (3, 2),
}.items():
    _TEXTURE[_t] = _amp


def _tissue_hu(p: dict) -> np.ndarray:
    """Mean HU per tissue for one phantom (seed-dependent values and contrast phase)."""
    c = p["contrast_hu"] if p["contrast"] else 40.0  # blood; iodinated contrast raises it
    enh = 1.0 if p["contrast"] else 0.0
    hu = np.zeros(_N_TISSUES, np.float32)
    hu[T_NONE] = -1000
    hu[T_AIR] = -1000
    hu[T_GAS] = -1000
    hu[T_LUNG] = p["hu_lung"]
    hu[T_FAT] = p["hu_fat"]
    hu[T_MUSCLE] = p["hu_muscle"]
    hu[T_SKIN] = 30
    hu[T_ARTERY] = c
    hu[T_VEIN] = 40 + 0.85 * (c - 40)
    hu[T_HEART_BLOOD] = 40 + 0.95 * (c - 40)
    hu[T_MYO] = 45 + 55 * enh
    hu[T_LIVER] = p["hu_liver"] + 10 * enh
    hu[T_SPLEEN] = p["hu_spleen"] + 12 * enh
    hu[T_KIDNEY] = 35 + enh * (0.7 * c - 35)
    hu[T_PANCREAS] = 45 + 30 * enh
    hu[T_GUTWALL] = 40 + 30 * enh
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
    hu[T_THYROID] = 100 + 60 * enh
    hu[T_EYE] = 10
    hu[T_LENS] = 90
    return hu


# ---------------------------------------------------------------------------------------
# Public types
# ---------------------------------------------------------------------------------------
@dataclass
class Lesion:
    """One inserted lesion.

    Attributes:
        center_kji: lesion centre in voxel indices (k, j, i).
        radius_mm: nominal radius in mm.
        organ: TotalSegmentator name of the organ that holds it.
        contrast_hu: signed mean HU change of the lesion against the organ.
        kind: "round" or "irregular".
        voxels: number of voxels in its mask.
    """

    center_kji: tuple[float, float, float]
    radius_mm: float
    organ: str
    contrast_hu: float
    kind: str
    voxels: int


@dataclass
class Phantom:
    """A synthetic CT volume with its labels.

    Attributes:
        hu: (k, j, i) float32 image in HU, with texture and CT noise.
        labels: (k, j, i) uint8 label map: TotalSegmentator v2 indices, ``anatomy.BODY_LABEL``
            for body tissue no other class claims, 0 outside the body.
        label_names: label value -> class name, for the values present.
        lesion_mask: (k, j, i) bool, True exactly on lesion voxels (all False without lesions).
        ijk_to_ras: (4, 4) float64 voxel-index -> RAS (mm) matrix.
        region: one of :data:`REGIONS`.
        clean_hu: (k, j, i) float32, ``hu`` without the CT noise (denoising ground truth).
        lesions: what :func:`insert_lesions` put in.
        contrast: whether blood is iodine-enhanced in this phantom.
    """

    hu: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    lesion_mask: np.ndarray
    ijk_to_ras: np.ndarray
    region: str
    clean_hu: np.ndarray
    lesions: list[Lesion] = field(default_factory=list)
    contrast: bool = False

    @property
    def spacing_kji(self) -> tuple[float, float, float]:
        """Voxel size in mm along (k, j, i)."""
        s = np.linalg.norm(np.asarray(self.ijk_to_ras)[:3, :3], axis=0)[::-1]
        return tuple(float(v) for v in s)  # type: ignore[return-value]

    def volume(self) -> Volume:
        """The image as a :class:`Volume` (shares the array)."""
        return Volume(self.hu, self.ijk_to_ras)

    def label_volume(self) -> Volume:
        """The label map as a :class:`Volume` (shares the array)."""
        return Volume(self.labels, self.ijk_to_ras)


# ---------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------
def _check_shape(shape_kji) -> tuple[int, int, int]:
    try:
        shape = tuple(operator.index(s) for s in shape_kji)
    except TypeError as exc:
        raise ValueError(f"shape_kji must be three positive integers, got {shape_kji!r}") from exc
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape_kji must be three positive integers (k, j, i), got {shape_kji!r}")
    return shape  # type: ignore[return-value]


def _check_spacing(spacing_kji) -> tuple[float, float, float]:
    try:
        spacing = tuple(float(s) for s in spacing_kji)
    except TypeError as exc:
        raise ValueError(f"spacing_kji must be three positive numbers (mm), got {spacing_kji!r}") from exc
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_kji must be three positive finite numbers (mm), got {spacing_kji!r}")
    return spacing  # type: ignore[return-value]


def _check_seed(seed) -> int:
    try:
        seed = operator.index(seed)
    except TypeError as exc:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}") from exc
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return seed


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def default_ijk_to_ras(shape_kji, spacing_kji) -> np.ndarray:
    """The phantoms' default voxel -> RAS matrix.

    Direction columns are RAS ``(-1, 0, 0)``, ``(0, -1, 0)``, ``(0, 0, 1)`` for ``i, j, k``
    (DICOM's identity LPS direction: ``i`` towards the patient's left, ``j`` posterior,
    ``k`` superior), scaled by the spacing; the origin puts the volume centre at RAS 0.

    Args:
        shape_kji: (k, j, i) voxel counts.
        spacing_kji: (k, j, i) voxel size in mm.

    Returns:
        (4, 4) float64 matrix.
    """
    shape = _check_shape(shape_kji)
    sk, sj, si = _check_spacing(spacing_kji)
    m = np.eye(4)
    m[:3, :3] = np.diag([-si, -sj, sk])
    centre_ijk = np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2])
    m[:3, 3] = -m[:3, :3] @ centre_ijk
    return m


def _check_matrix(ijk_to_ras, spacing) -> np.ndarray:
    m = np.array(ijk_to_ras, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"ijk_to_ras must be a finite 4x4 matrix, got shape {m.shape}")
    if not np.allclose(m[3], [0, 0, 0, 1]):
        raise ValueError("ijk_to_ras must be affine: its last row must be (0, 0, 0, 1)")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError("ijk_to_ras is singular")
    norms_kji = np.linalg.norm(m[:3, :3], axis=0)[::-1]
    if not np.allclose(norms_kji, spacing, rtol=1e-3, atol=1e-6):
        raise ValueError(
            f"ijk_to_ras column norms (spacing k, j, i = {tuple(np.round(norms_kji, 6))}) do not "
            f"match spacing_kji = {tuple(spacing)}")
    return m


# ---------------------------------------------------------------------------------------
# Smooth random fields on a lattice in mm (independent of voxel size)
# ---------------------------------------------------------------------------------------
class _Fields:
    """Unit-variance smooth Gaussian random fields over the field of view.

    A field is a random lattice with spacing ``cell_mm`` laid over the physical field of
    view and interpolated with separable Gaussian weights. The lattice depends only on the
    field of view and ``cell_mm``, so two grids covering the same field of view sample the
    same continuous field: label decisions taken on such a field agree across resolutions.
    """

    def __init__(self, axes_mm: tuple[np.ndarray, np.ndarray, np.ndarray], extent_mm, rng):
        self.axes = axes_mm  # voxel-centre coordinates along k, j, i (mm, centred)
        self.extent = extent_mm  # field of view along k, j, i (mm)
        self.rng = rng

    def _weights(self, coords: np.ndarray, extent: float, cell: float) -> np.ndarray:
        n = int(math.ceil(extent / cell)) + 7
        centres = (np.arange(n) - (n - 1) / 2) * cell
        w = np.exp(-0.5 * ((coords[:, None] - centres[None, :]) / (0.75 * cell)) ** 2)
        w /= np.sqrt(np.sum(w * w, axis=1, keepdims=True))
        return w.astype(np.float32)

    def new(self, cell_mm: float, box: tuple[slice, slice, slice] | None = None) -> np.ndarray:
        """Draw a field with correlation length ~``cell_mm``; evaluate it on ``box`` (slices)."""
        sizes = [int(math.ceil(e / cell_mm)) + 7 for e in self.extent]
        lattice = self.rng.standard_normal(sizes, dtype=np.float32)
        box = box or (slice(None),) * 3
        wk, wj, wi = (self._weights(a[s], e, cell_mm) for a, s, e in zip(self.axes, box, self.extent))
        tmp = np.tensordot(wk, lattice, axes=(1, 0))  # (nk, Lj, Li)
        tmp = np.tensordot(tmp, wi, axes=(2, 1))  # (nk, Lj, ni)
        nk, lj, ni = tmp.shape
        out = wj @ tmp.transpose(1, 0, 2).reshape(lj, nk * ni)  # (nj, nk * ni)
        return np.ascontiguousarray(out.reshape(wj.shape[0], nk, ni).transpose(1, 0, 2))


# ---------------------------------------------------------------------------------------
# The canvas: coordinates in the anatomy frame and painting with priorities
# ---------------------------------------------------------------------------------------
class _Canvas:
    """Label and tissue arrays plus voxel-centre coordinates in the anatomy frame.

    Anatomy frame (dimensionless, ``unit_mm`` per unit): ``U`` towards the patient's left,
    ``V`` posterior, ``T`` superior. ``(U, V) = R(angle) (x, y) / unit + (u0, v0)`` where
    ``x, y`` are mm along ``i, j`` from the volume centre, and ``T = z / unit + t0``.
    """

    def __init__(self, shape, spacing, unit_mm, t0, angle, u0, v0):
        nk, nj, ni = shape
        sk, sj, si = spacing
        self.shape = shape
        self.spacing = spacing
        self.unit = unit_mm
        self.z = ((np.arange(nk) - (nk - 1) / 2) * sk)
        self.y = ((np.arange(nj) - (nj - 1) / 2) * sj)
        self.x = ((np.arange(ni) - (ni - 1) / 2) * si)
        self.t0, self.u0, self.v0 = t0, u0, v0
        self.c, self.s = math.cos(angle), math.sin(angle)
        xn = self.x[None, :] / unit_mm
        yn = self.y[:, None] / unit_mm
        self.U2 = self.c * xn - self.s * yn + u0  # (nj, ni)
        self.V2 = self.s * xn + self.c * yn + v0
        self.T1 = self.z / unit_mm + t0  # (nk,)
        self.labels = np.zeros(shape, np.uint8)
        self.tissue = np.zeros(shape, np.uint8)
        self._luts: dict = {}

    # -- boxes -----------------------------------------------------------------------------
    def box(self, ulo, uhi, vlo, vhi, tlo, thi):
        """Slices (k, j, i) of the voxels whose centres may lie in an anatomy-frame box."""
        us = np.array([ulo, uhi, ulo, uhi]) - self.u0
        vs = np.array([vlo, vlo, vhi, vhi]) - self.v0
        xs = (self.c * us + self.s * vs) * self.unit
        ys = (-self.s * us + self.c * vs) * self.unit
        zs = (np.array([tlo, thi]) - self.t0) * self.unit
        out = []
        for lo, hi, n, sp in ((zs.min(), zs.max(), self.shape[0], self.spacing[0]),
                              (ys.min(), ys.max(), self.shape[1], self.spacing[1]),
                              (xs.min(), xs.max(), self.shape[2], self.spacing[2])):
            a = max(0, int(math.ceil(lo / sp + (n - 1) / 2 - 1e-9)))
            b = min(n, int(math.floor(hi / sp + (n - 1) / 2 + 1e-9)) + 1)
            if b <= a:
                return None
            out.append(slice(a, b))
        return tuple(out)

    def coords(self, sl):
        """(U, V, T) broadcastable over the box ``sl``: shapes (1, nj, ni), (1, nj, ni), (nk, 1, 1)."""
        sk, sj, si = sl
        return self.U2[sj, si][None], self.V2[sj, si][None], self.T1[sk][:, None, None]

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
        lab = self.labels[sl]
        ok = np.broadcast_to(mask, lab.shape) & self._lut(over)[lab]
        if label is not None:
            lab[ok] = label
        if tissue is not None:
            self.tissue[sl][ok] = tissue

    def ellipsoid(self, centre, semi, angle=0.0, label=None, tissue=None, over=(BODY,), extra=None):
        """Paint an ellipsoid (semi-axes along the in-plane axes rotated by ``angle``, and T).

        ``extra(U, V, T)`` may return a further mask to AND in. Returns the box and mask.
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
            mask = mask & extra(U, V, T)
        if tissue is not None or label is not None:
            self.paint(sl, mask, label, tissue, over)
        return sl, mask

    def tube(self, points, radii, label=None, tissue=None, over=(BODY,), extra=None):
        """Paint a tube along a polyline; ``radii`` per point, linearly interpolated."""
        pts = np.asarray(points, float)
        rad = np.broadcast_to(np.asarray(radii, float), (len(pts),))
        for (pa, ra), (pb, rb) in zip(zip(pts[:-1], rad[:-1]), zip(pts[1:], rad[1:])):
            rm = max(ra, rb)
            lo = np.minimum(pa, pb) - rm
            hi = np.maximum(pa, pb) + rm
            sl = self.box(lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])
            if sl is None:
                continue
            U, V, T = self.coords(sl)
            d = pb - pa
            dd = float(d @ d) or 1e-12
            s = np.clip(((U - pa[0]) * d[0] + (V - pa[1]) * d[1] + (T - pa[2]) * d[2]) / dd, 0.0, 1.0)
            dist2 = (U - pa[0] - s * d[0]) ** 2 + (V - pa[1] - s * d[1]) ** 2 + (T - pa[2] - s * d[2]) ** 2
            mask = dist2 < (ra + s * (rb - ra)) ** 2
            if extra is not None:
                mask = mask & extra(U, V, T)
            self.paint(sl, mask, label, tissue, over)

    def hollow_tube(self, points, radii, wall, label, wall_tissue, lumen_tissue, over=(BODY,), extra=None):
        """A tube whose outer ``wall`` (units) is ``wall_tissue`` and inside ``lumen_tissue``."""
        self.tube(points, radii, label, wall_tissue, over, extra)
        inner = np.maximum(np.asarray(radii, float) - wall, 1e-3)
        self.tube(points, inner, label, lumen_tissue, over=(label,), extra=extra)


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _superellipse_rho(U, V, a, b_ant, b_post):
    """Normalised radius of a superellipse (flatter posteriorly): 1 on the boundary.

    Homogeneous of degree one, so ``r * (1 / rho - 1)`` is the radial depth below it.
    """
    post = V >= 0
    p = np.where(post, 2.4, 2.0)
    b = np.where(post, b_post, b_ant)
    return ((np.abs(U) / a) ** p + (np.abs(V) / b) ** p) ** (1.0 / p)


def _bezier(p0, p1, p2, n=24):
    s = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - s) ** 2 * np.asarray(p0) + 2 * (1 - s) * s * np.asarray(p1) + s ** 2 * np.asarray(p2)


def _polyline_dist2d(U, V, pts):
    """Distance from points (U, V) to a 2-D polyline, and which side (+1 left of travel)."""
    best = np.full(np.broadcast(U, V).shape, np.inf)
    side = np.zeros_like(best)
    for a, b in zip(pts[:-1], pts[1:]):
        d = b - a
        s = np.clip(((U - a[0]) * d[0] + (V - a[1]) * d[1]) / float(d @ d), 0, 1)
        du, dv = U - a[0] - s * d[0], V - a[1] - s * d[1]
        dist = np.hypot(du, dv)
        closer = dist < best
        best = np.where(closer, dist, best)
        side = np.where(closer, np.sign(d[0] * (V - a[1]) - d[1] * (U - a[0])), side)
    return best, side


# ---------------------------------------------------------------------------------------
# Parameters drawn per seed
# ---------------------------------------------------------------------------------------
def _common_params(rng) -> dict:
    u = rng.uniform
    return {
        "contrast": bool(rng.random() < 0.5),
        "contrast_hu": u(150, 250),
        "hu_lung": u(-890, -855),
        "hu_fat": u(-110, -85),
        "hu_muscle": u(42, 58),
        "hu_liver": u(55, 65),
        "hu_spleen": u(45, 55),
        "hu_canc": u(170, 290),
        "hu_cort": u(750, 1150),
        "hu_gm": u(35, 40),
        "angle": u(-0.07, 0.07),  # in-plane rotation, rad (~ +-4 degrees)
        "shift_u": u(-0.03, 0.03),
        "shift_v": u(-0.03, 0.03),
        "t_shift": u(-0.08, 0.08),
    }


def _trunk_params(rng) -> dict:
    u = rng.uniform
    s = u(0.93, 1.07)
    return {
        "bc": u(0.62, 0.76),  # cavity AP / lateral half-width
        "m": u(0.045, 0.07),  # muscle wall
        "f": u(0.04, 0.28),  # subcutaneous fat: slim .. obese
        "pT": 0.19 * s, "pL": 0.28 * s, "pC": 0.13 * s,
        "vb_scale": u(0.9, 1.1),
        "t_dR": u(0.45, 0.65),  # right diaphragm dome; lower dome = larger lungs
        "dL": u(0.04, 0.11),
        "heart_scale": u(0.88, 1.12), "heart_u": u(0.06, 0.15), "heart_angle": u(-0.65, -0.35),
        "arch_t": u(1.72, 1.88), "aorta_scale": u(0.9, 1.15), "t_bif": u(-1.1, -0.88),
        "liver_scale": u(0.9, 1.12), "spleen_scale": u(0.8, 1.2),
        "kidney_scale": u(0.88, 1.1), "kidney_dt": u(-0.12, 0.12), "kidney_r_lower": u(0.04, 0.2),
        "stomach_level": u(-0.6, 0.05), "stomach_scale": u(0.85, 1.15),
        "colon_gas": u(-0.2, 1.2), "colon_r": u(0.1, 0.14), "bowel_fill": u(0.9, 1.25),
        "crest_t": u(-1.25, -1.05),
        "gall": u(0.7, 1.2),
    }


def _head_params(rng) -> dict:
    u = rng.uniform
    return {
        "bh": u(1.1, 1.3),  # cranium AP / lateral half-width
        "ch": u(0.8, 0.9),  # cranium height above its centre
        "t_cr": u(0.4, 0.5),
        "skull": u(0.07, 0.1),
        "scalp": u(0.05, 0.1),
        "csf": u(0.01, 0.05),  # subarachnoid CSF (atrophy with age)
        "vent": u(0.7, 1.5),
        "neck_a": u(0.66, 0.8), "neck_b": u(0.62, 0.75), "neck_fat": u(0.04, 0.14),
        "pC": u(0.15, 0.17),
        "t_bif": u(-0.62, -0.48),
        "thyroid": u(0.8, 1.2),
    }


# ---------------------------------------------------------------------------------------
# Spine (shared by trunk and neck)
# ---------------------------------------------------------------------------------------
def _paint_vertebra(cv: _Canvas, name: str, tc: float, pitch: float, v_vb: float, a: float, b: float,
                    canal_r: float, sp_len: float, tp_len: float, cord_r: float, has_cord: bool,
                    has_body: bool = True):
    """One vertebra: canal (cord, CSF), body with cortex, arch, processes, discs."""
    label = _lab(name)
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
        cv.paint(sl, rc < cord_r, _lab("spinal_cord"), T_CORD)
    cv.paint(sl, canal & (rc < 0.75 * canal_r), _RESERVED, T_CSF)
    cv.paint(sl, canal, _RESERVED, T_FAT)  # epidural fat
    # Vertebral body: elliptic cylinder with a cortical shell; discs between bodies.
    q = (U / a) ** 2 + ((V - v_vb) / b) ** 2
    if has_body:
        cv.paint(sl, (q < 0.82) & (dt < 0.40 * pitch), label, T_CANC)
        cv.paint(sl, (q < 1.0) & (dt < 0.42 * pitch), label, T_CORT)
        cv.paint(sl, (q < 1.0) & (dt >= 0.42 * pitch), _RESERVED, T_DISC)
    # Arch (pedicles + laminae) around the canal, then processes.
    post = dt < 0.33 * pitch
    cv.paint(sl, (rc >= canal_r) & (rc < canal_r + 0.045) & post, label, T_CORT)
    spin = (np.abs(U) < 0.028) & (V > v_canal) & (V < v_canal + canal_r + sp_len) & \
        (np.abs(T - tc + 0.15 * pitch) < 0.3 * pitch)
    cv.paint(sl, spin, label, T_CORT)
    trans = (np.abs(V - v_canal + 0.01) < 0.035) & (np.abs(U) < tp_len) & (dt < 0.2 * pitch)
    cv.paint(sl, trans, label, T_CORT)


# ---------------------------------------------------------------------------------------
# Trunk: one continuous model; the chest and abdomen are two windows on it
# ---------------------------------------------------------------------------------------
_TRUNK_CENTRE = {"chest": 1.15, "abdomen": -0.65}


def _trunk_extent(p):
    """(lateral half-extent, AP half-extent, AP centre) of the body in trunk units."""
    lat = 1 + p["m"] + p["f"]
    ant = p["bc"] + p["m"] + 1.25 * p["f"]
    post = p["bc"] + p["m"] + 0.6 * p["f"]
    return lat, (ant + post) / 2, (post - ant) / 2


def _build_trunk(cv: _Canvas, p: dict, fields: _Fields):
    U2, V2 = cv.U2, cv.V2
    bc, m, f = p["bc"], p["m"], p["f"]
    T1 = cv.T1
    t_lo, t_hi = float(T1.min()), float(T1.max())

    # -- body wall: skin, subcutaneous fat, muscle, cavity (2-D, constant along z) ----------
    rho_body = _superellipse_rho(U2, V2, 1 + m + f, bc + m + 1.25 * f, bc + m + 0.6 * f)
    rho_skin = _superellipse_rho(U2, V2, 1 + m + f - 0.012, bc + m + 1.25 * f - 0.012, bc + m + 0.6 * f - 0.012)
    rho_mus = _superellipse_rho(U2, V2, 1 + m, bc + m, bc + m)
    rho_c = np.maximum(_superellipse_rho(U2, V2, 1.0, bc, bc), 1e-6)
    r2 = np.hypot(U2, V2)
    depth_c = r2 * (1.0 / rho_c - 1.0)  # radial depth below the cavity boundary
    rim = 0.055  # deep muscle layer inside the cavity boundary (intercostals, transversus)
    lab2 = np.where(rho_body < 1, BODY, 0).astype(np.uint8)
    tis2 = np.full(U2.shape, T_AIR, np.uint8)
    tis2[rho_body < 1] = T_SKIN
    tis2[rho_skin < 1] = T_FAT
    tis2[rho_mus < 1] = T_MUSCLE
    tis2[depth_c > rim] = T_FAT  # visceral / mediastinal fat by default
    cv.labels[:] = lab2[None]
    cv.tissue[:] = tis2[None]

    # -- landmarks --------------------------------------------------------------------------
    pT, pL, pC = p["pT"], p["pL"], p["pC"]
    vbs = p["vb_scale"]
    v_vb = bc - 0.45  # vertebral body centre
    t_dR = p["t_dR"]
    t_dL = t_dR - p["dL"]

    def t_diaph(U, V):
        dome = t_dR + (t_dL - t_dR) * _smoothstep((U + 0.15) / 0.3)
        return dome - 0.9 * (np.abs(U) - 0.42) ** 2 - 1.0 * np.maximum(V + 0.1, 0) ** 2

    def inside_rim(U, V):  # room for organs: deeper than the muscle rim
        rho = np.maximum(_superellipse_rho(U, V, 1.0, bc, bc), 1e-6)
        return np.hypot(U, V) * (1 / rho - 1) > rim

    def below_diaph(U, V, T):
        return inside_rim(U, V) & (T < t_diaph(U, V) - 0.025)

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
        _paint_vertebra(cv, name, tc, pitch, v_vb, a * vbs, b * vbs, cr, sp, tp, 0.035,
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
            cv.paint(sl, q < 0.75, _lab("sacrum"), T_CANC)
            cv.paint(sl, q < 1.0, _lab("sacrum"), T_CORT)

    # -- back and psoas muscles ---------------------------------------------------------------
    for side, nm in ((1, "left"), (-1, "right")):
        au = 0.2 * side
        sl = cv.box(au - 0.16, au + 0.16, v_vb + 0.15, v_vb + 0.45, t_lo, t_hi)
        if sl is not None:
            U, V, T = cv.coords(sl)
            mask = ((U - au) / 0.15) ** 2 + ((V - v_vb - 0.3) / 0.135) ** 2 < 1
            cv.paint(sl, mask & (T > t_S1 - 0.2), _lab(f"autochthon_{nm}"), T_MUSCLE)
        pts = [(0.14 * side, v_vb - 0.02, 0.12), (0.2 * side, v_vb, -0.3), (0.26 * side, v_vb, -0.8),
               (0.32 * side, v_vb - 0.05, -1.3), (0.4 * side, v_vb - 0.2, -1.8), (0.45 * side, v_vb - 0.3, -2.4)]
        cv.tube(pts, [0.02, 0.07, 0.11, 0.13, 0.12, 0.11], _lab(f"iliopsoas_{nm}"), T_MUSCLE)

    # -- rib cage, sternum, scapulae, clavicles -----------------------------------------------
    _paint_cage(cv, p, rho_c, depth_c, t_T1, v_vb)

    # Posterior abdominal wall (quadratus lumborum) below the diaphragm: keeps organs in front.
    sl = cv.box(-0.8, 0.8, v_vb + 0.1, bc, t_lo, t_hi)
    if sl is not None:
        U, V, T = cv.coords(sl)
        mask = (V > v_vb + 0.16) & below_diaph(U, V, T) & (np.abs(U) > 0.3)
        cv.paint(sl, mask, _RESERVED, T_MUSCLE)

    # -- pelvis: iliac wings with iliacus inside and gluteus medius outside -------------------
    t_crest = p["crest_t"]
    if t_lo < t_crest:
        for side, nm in ((1, "left"), (-1, "right")):
            pts = _bezier((0.24 * side, v_vb + 0.22), (0.72 * side, v_vb + 0.2), (0.86 * side, -0.25))
            dist, sd = _polyline_dist2d(U2, V2, pts)
            sd = sd * side  # +1 towards the body centre for both sides
            sl = cv.box(-1.0, 1.0, -bc, bc, t_lo, t_crest)
            if sl is None:
                continue
            d2 = dist[sl[1], sl[2]][None]
            s2 = sd[sl[1], sl[2]][None]
            U, V, T = cv.coords(sl)
            # The wing tapers towards the crest.
            thick = 0.035 * np.clip((t_crest - T) / 0.15, 0.4, 1.0)
            cv.paint(sl, d2 < 0.5 * thick, _lab(f"hip_{nm}"), T_CANC)
            cv.paint(sl, d2 < thick, _lab(f"hip_{nm}"), T_CORT)
            cv.paint(sl, (d2 < 0.1) & (s2 < 0), _lab(f"iliopsoas_{nm}"), T_MUSCLE)
            cv.paint(sl, (d2 < 0.17) & (s2 > 0) & (T < t_crest - 0.03), _lab(f"gluteus_medius_{nm}"), T_MUSCLE)

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
    cv.tube(aorta, np.array(arad) * as_, _lab("aorta"), T_ARTERY)
    for side, nm in ((1, "left"), (-1, "right")):
        cv.tube([(0.04 * side, v_vb - 0.23, t_bif + 0.02), (0.28 * side, v_vb - 0.18, t_bif - 0.45),
                 (0.42 * side, v_vb - 0.3, t_bif - 1.0)], 0.045 * as_, _lab(f"iliac_artery_{nm}"), T_ARTERY)
        cv.tube([(0.05 * side - 0.12, v_vb - 0.1, t_bif - 0.05), (0.24 * side, v_vb - 0.08, t_bif - 0.45),
                 (0.38 * side, v_vb - 0.2, t_bif - 1.0)], 0.05, _lab(f"iliac_vena_{nm}"), T_VEIN)
    # Arch branches up to the thoracic inlet.
    top_t = arch_t + 0.9
    cv.tube([(0.0, -0.2, arch_t - 0.02), (-0.1, -0.16, arch_t + 0.22)], 0.045, _lab("brachiocephalic_trunk"), T_ARTERY)
    cv.tube([(-0.1, -0.16, arch_t + 0.22), (-0.14, -0.12, top_t)], 0.035, _lab("common_carotid_artery_right"), T_ARTERY)
    cv.tube([(-0.1, -0.16, arch_t + 0.22), (-0.35, -0.08, arch_t + 0.35), (-0.7, -0.1, arch_t + 0.4)], 0.035,
            _lab("subclavian_artery_right"), T_ARTERY)
    cv.tube([(0.07, -0.14, arch_t), (0.13, -0.12, top_t)], 0.035, _lab("common_carotid_artery_left"), T_ARTERY)
    cv.tube([(0.13, -0.04, arch_t - 0.02), (0.22, -0.02, arch_t + 0.25), (0.5, -0.05, arch_t + 0.4),
             (0.75, -0.1, arch_t + 0.42)], 0.037, _lab("subclavian_artery_left"), T_ARTERY)
    # Veins: SVC, brachiocephalic veins, IVC.
    cv.tube([(-0.16, -0.17, t_ht - 0.05), (-0.16, -0.17, arch_t + 0.2)], 0.055, _lab("superior_vena_cava"), T_VEIN)
    cv.tube([(-0.16, -0.18, arch_t + 0.2), (0.1, -0.28, arch_t + 0.3), (0.45, -0.25, arch_t + 0.4)], 0.04,
            _lab("brachiocephalic_vein_left"), T_VEIN)
    cv.tube([(-0.16, -0.17, arch_t + 0.2), (-0.3, -0.15, arch_t + 0.45), (-0.5, -0.12, arch_t + 0.55)], 0.045,
            _lab("brachiocephalic_vein_right"), T_VEIN)
    cv.tube([(-0.1, -0.08, t_hc - 0.05), (-0.15, v_vb - 0.14, t_dR - 0.3), (-0.14, v_vb - 0.16, -0.4),
             (-0.12, v_vb - 0.13, t_bif - 0.05)], [0.07, 0.08, 0.075, 0.07], _lab("inferior_vena_cava"), T_VEIN)

    # -- airway and oesophagus -----------------------------------------------------------------
    t_car = 1.45
    trachea = [(0.0, v_vb - 0.3, t_hi + 0.2), (0.0, v_vb - 0.3, t_car)]
    cv.hollow_tube(trachea, 0.075, 0.014, _lab("trachea"), T_CARTILAGE, T_AIR)
    cv.hollow_tube([(0.0, v_vb - 0.3, t_car), (-0.24, v_vb - 0.24, t_car - 0.18)], 0.05, 0.01, _lab("trachea"), T_GUTWALL, T_AIR)
    cv.hollow_tube([(0.0, v_vb - 0.3, t_car), (0.27, v_vb - 0.21, t_car - 0.26)], 0.045, 0.01, _lab("trachea"), T_GUTWALL, T_AIR)
    eso = [(0.02, v_vb - 0.175, t_hi + 0.2), (0.03, v_vb - 0.18, 0.9), (0.12, v_vb - 0.25, t_dL - 0.02),
           (0.3, -0.02, t_dL - 0.15)]
    cv.tube(eso, 0.045, _lab("esophagus"), T_GUTWALL)

    # -- heart ---------------------------------------------------------------------------------------
    hc = (p["heart_u"], -0.2, t_hc)
    hsemi = (0.5 * hs, 0.34 * hs, 0.4 * hs)
    ha = p["heart_angle"]

    def above_diaph(U, V, T):
        return T > t_diaph(U, V) + 0.02

    cv.ellipsoid(hc, (0.72 * hsemi[0], 0.65 * hsemi[1], 0.72 * hsemi[2]), ha, _lab("heart"), T_HEART_BLOOD,
                 extra=above_diaph)
    cv.ellipsoid(hc, hsemi, ha, _lab("heart"), T_MYO, extra=above_diaph)
    # Pulmonary trunk and arteries (no TotalSegmentator class: body tissue).
    cv.tube([(0.12, -0.36, t_ht - 0.1), (0.08, -0.22, t_car - 0.12), (0.3, -0.06, t_car - 0.1)], 0.07, _RESERVED, T_VEIN)
    cv.tube([(0.08, -0.22, t_car - 0.12), (-0.3, -0.1, t_car - 0.2)], 0.06, _RESERVED, T_VEIN)

    # -- abdominal organs (priority = painting order) --------------------------------------------
    ks = p["kidney_scale"]
    t_kL = -0.32 + p["kidney_dt"]
    for side, nm, tk in ((1, "left", t_kL), (-1, "right", t_kL - p["kidney_r_lower"])):
        kc = (0.42 * side, v_vb + 0.02, tk)
        ang = side * 0.6
        # renal sinus fat first (reserved) so that the kidney becomes a bean
        off = 0.11
        sc = (kc[0] - side * off * math.cos(0.6), kc[1] - off * math.sin(0.6), tk)
        cv.ellipsoid(sc, (0.07 * ks, 0.055 * ks, 0.17 * ks), ang, _RESERVED, T_FAT, extra=below_diaph)
        cv.ellipsoid(kc, (0.19 * ks, 0.125 * ks, 0.36 * ks), ang, _lab(f"kidney_{nm}"), T_KIDNEY, extra=below_diaph)
        cv.ellipsoid(kc, (0.24 * ks, 0.17 * ks, 0.41 * ks), ang, _RESERVED, T_FAT, extra=below_diaph)
    # Portal and splenic vein, then pancreas along it.
    t_pv = -0.32
    cv.tube([(0.5, 0.18, t_pv + 0.2), (0.2, -0.05, t_pv + 0.05), (0.0, -0.15, t_pv), (-0.22, -0.12, t_pv + 0.3),
             (-0.35, -0.05, t_pv + 0.45)], 0.04, _lab("portal_vein_and_splenic_vein"), T_VEIN, extra=below_diaph)
    cv.tube([(-0.17, -0.14, t_pv - 0.12), (0.0, -0.23, t_pv + 0.02), (0.25, -0.14, t_pv + 0.12),
             (0.48, 0.12, t_pv + 0.22)], [0.1, 0.07, 0.065, 0.05], _lab("pancreas"), T_PANCREAS, extra=below_diaph)
    # Gallbladder under the liver.
    gs = p["gall"]
    cv.ellipsoid((-0.36, -0.42, t_dR - 0.78), (0.08 * gs, 0.09 * gs, 0.16 * gs), 0.3, _lab("gallbladder"), T_FLUID,
                 extra=below_diaph)
    # Liver: right lobe + left lobe, clipped by the diaphragm and the rim.
    ls = p["liver_scale"]
    for c, s in (((-0.4, -0.04, t_dR - 0.42 * ls), (0.62 * ls, 0.66 * ls, 0.56 * ls)),
                 ((0.12, -0.36, t_dR - 0.2 * ls), (0.4 * ls, 0.22 * ls, 0.2 * ls))):
        cv.ellipsoid(c, s, 0.0, _lab("liver"), T_LIVER, extra=below_diaph)
    # Spleen along the left posterolateral wall.
    ss = p["spleen_scale"]
    spc = (0.62, 0.3, t_dL - 0.36)
    cv.ellipsoid(spc, (0.13 * ss, 0.27 * ss, 0.24 * ss), math.atan2(spc[1], spc[0]), _lab("spleen"), T_SPLEEN,
                 extra=below_diaph)
    # Stomach: J-shaped tube from the fundus to the pylorus; gas above a fluid level.
    st = p["stomach_scale"]
    sp = [(0.42, 0.08, t_dL - 0.12), (0.44, -0.16, t_dL - 0.38), (0.3, -0.4, t_dL - 0.66),
          (0.02, -0.46, t_dL - 0.76), (-0.15, -0.36, t_dL - 0.72)]
    srad = np.array([0.2, 0.19, 0.15, 0.1, 0.06]) * st
    cv.hollow_tube(sp, srad, 0.025, _lab("stomach"), T_GUTWALL, T_FLUID, extra=below_diaph)
    lvl = p["stomach_level"]
    cv.tube(sp, srad - 0.025, None, T_GAS, over=(_lab("stomach"),), extra=lambda U, V, T: V < lvl)
    # Duodenum: C-loop around the pancreatic head.
    duo = [(-0.15, -0.36, t_dL - 0.72), (-0.3, -0.24, t_pv - 0.02), (-0.33, -0.08, t_pv - 0.3),
           (-0.18, -0.1, t_pv - 0.5), (0.12, -0.14, t_pv - 0.5), (0.2, -0.22, t_pv - 0.25)]
    cv.hollow_tube(duo, 0.065, 0.02, _lab("duodenum"), T_GUTWALL, T_FLUID, extra=below_diaph)
    # Colon frame: ascending, transverse, descending, sigmoid.
    cr = p["colon_r"]
    colon = [(-0.7, -0.08, -2.4), (-0.7, -0.08, -1.1), (-0.68, -0.14, -0.62), (-0.55, -0.34, -0.45),
             (-0.25, -0.5, -0.62), (0.1, -0.52, -0.72), (0.45, -0.38, -0.42), (0.7, -0.08, -0.22),
             (0.74, 0.0, -0.7), (0.7, -0.02, -1.3), (0.5, -0.3, -1.75), (0.1, -0.2, -2.0), (0.0, 0.2, -2.5)]
    cv.hollow_tube(colon, cr, 0.018, _lab("colon"), T_GUTWALL, T_STOOL, extra=below_diaph)
    bbox = cv.box(-1, 1, -bc, bc, t_lo, min(t_hi, 0.2))
    if bbox is not None:
        # Gas pockets replace stool inside the lumen only (the wall stays).
        gas = fields.new(0.12 * cv.unit, bbox) > p["colon_gas"]
        sub_t = cv.tissue[bbox]
        sub_t[gas & (sub_t == T_STOOL)] = T_GAS
    # Small bowel: convoluted loops from two smooth fields, in the mid/lower abdomen.
    sb = cv.box(-0.9, 0.9, -bc, v_vb, max(t_lo, -2.3), min(t_hi, -0.3))
    if sb is not None:
        U, V, T = cv.coords(sb)
        f1 = fields.new(0.16 * cv.unit, sb)
        f2 = fields.new(0.16 * cv.unit, sb)
        r2f = f1 * f1 + f2 * f2
        w2 = 1.6 * p["bowel_fill"]
        zone = below_diaph(U, V, T) & (V < v_vb - 0.05) & (T < -0.3 - 0.2 * np.clip(U + 0.2, 0, 1))
        cv.paint(sb, zone & (r2f < w2), _lab("small_bowel"), T_GUTWALL)
        cv.paint(sb, zone & (r2f < 0.45 * w2), _lab("small_bowel"), T_BOWEL, over=(_lab("small_bowel"),))

    # -- lungs --------------------------------------------------------------------------------------
    _paint_lungs(cv, p, rho_c, t_diaph, hc, hsemi, ha, v_vb, t_car, t_T1)


def _cage_geometry():
    """Cage narrowing towards the thoracic inlet, and the posterolateral inset that leaves
    room for the scapulae and their muscles (both in trunk units)."""

    def g_top(T):  # the thoracic cage narrows towards the inlet
        return 1.0 - 0.42 * np.clip((T - 1.7) / 0.75, 0, 1) ** 2

    def inset(phin, T):
        w_s = np.exp(-((phin - 0.3) / 0.14) ** 2)
        w_c = _smoothstep((T - 0.85) / 0.3)
        return 0.13 * w_s * w_c

    return g_top, inset


def _paint_cage(cv: _Canvas, p, rho_c, depth_c, t_T1, v_vb):
    bc = p["bc"]
    pT = p["pT"]
    g_top, inset = _cage_geometry()
    nk = cv.shape[0]
    T = cv.T1[:, None]
    # Candidate pixels: a band inside the cavity boundary.
    band = (rho_c < 1.0) & (rho_c > 0.45)
    idx = np.flatnonzero(band)
    if idx.size == 0:
        return
    U = cv.U2.ravel()[idx][None]
    V = cv.V2.ravel()[idx][None]
    r = np.hypot(U, V)
    rc = rho_c.ravel()[idx][None]
    phin = np.arctan2(np.abs(U), V) / math.pi  # 0 at the posterior midline, 1 anterior
    d_cage = g_top(T) * r / rc - r - inset(phin, T)  # depth below the cage surface
    d_cav = depth_c.ravel()[idx][None] + 0 * T
    lab = cv.labels.reshape(nk, -1)
    tis = cv.tissue.reshape(nk, -1)
    sub_l = lab[:, idx]
    sub_t = tis[:, idx]

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
        put(bone & sel & side_left & core, _lab(f"rib_left_{k}"), T_CANC)
        put(bone & sel & side_left, _lab(f"rib_left_{k}"), T_CORT)
        put(bone & sel & ~side_left & core, _lab(f"rib_right_{k}"), T_CANC)
        put(bone & sel & ~side_left, _lab(f"rib_right_{k}"), T_CORT)
    put(in_rib & (phin >= bone_end) & (phin < cart_end), _lab("costal_cartilages"), T_CARTILAGE)
    # Sternum: anterior midline plate, manubrium wider at the top.
    t_top = t_T1 - 1.3 * pT
    t_xi = t_T1 - 6 * pT - 3.4 * pT
    st_half = 0.085 + 0.05 * np.clip((T - t_top + 0.3) / 0.3, 0, 1)
    stern = (np.abs(U) < st_half) & (np.abs(d_cage - d0) < 0.03) & (phin > 0.9) & (T < t_top) & (T > t_xi)
    put(stern & (np.abs(d_cage - d0) < 0.015) & (np.abs(U) < st_half - 0.015), _lab("sternum"), T_CANC)
    put(stern, _lab("sternum"), T_CORT)
    # Scapulae: thin blades in the posterolateral muscle layer outside the ribs.
    scap = (phin > 0.17) & (phin < 0.42) & (T > 0.95) & (T < t_T1 + 0.1) & (d_cav > 0.02) & (d_cav < 0.045) & \
        (d_cage < -0.02)
    put(scap & (U > 0), _lab("scapula_left"), T_CORT)
    put(scap & (U <= 0), _lab("scapula_right"), T_CORT)
    # Muscle between the cavity boundary and the (inset or narrowed) cage.
    put((d_cage < 0.0) & (d_cav > 0), _RESERVED, T_MUSCLE)
    lab[:, idx] = sub_l
    tis[:, idx] = sub_t
    # Rib necks: from the vertebral body to where the arc starts.
    for k in range(1, 13):
        tn = t_T1 - (k - 1) * pT
        if tn + 0.3 < cv.T1.min() or tn - 0.3 > cv.T1.max():
            continue
        ph = 0.17
        for side, nm in ((1, "left"), (-1, "right")):
            ang = ph * math.pi
            rb = 1.0 / ((abs(math.sin(ang))) ** 2.4 + (abs(math.cos(ang)) / bc) ** 2.4) ** (1 / 2.4)
            g = float(g_top(np.array(tn)))
            rr = g * rb - d0 - float(inset(np.array(ph), np.array(tn)))
            end = (side * rr * math.sin(ang), rr * math.cos(ang), tn - 3.4 * pT * ph ** 1.4)
            cv.tube([(side * 0.13, v_vb + 0.06, tn), end], 0.028, _lab(f"rib_{nm}_{k}"), T_CORT)
    # Clavicles at the top of the chest.
    t_cl = t_T1 - 0.05
    for side, nm in ((1, "left"), (-1, "right")):
        cv.tube([(0.1 * side, -bc + 0.04, t_cl), (0.5 * side, -bc + 0.06, t_cl + 0.15),
                 (0.88 * side, -0.25, t_cl + 0.22)], 0.038, _lab(f"clavicula_{nm}"), T_CORT)


def _paint_lungs(cv: _Canvas, p, rho_c, t_diaph, hc, hsemi, ha, v_vb, t_car, t_T1):
    bc = p["bc"]
    g_top, inset = _cage_geometry()
    t_apex = t_T1 + 0.22
    t_lo = float(cv.T1.min())
    sl = cv.box(-1, 1, -bc, bc, max(t_lo, float(np.min(t_diaph(np.array([0.9]), np.array([0.8]))))), t_apex)
    if sl is None:
        return
    U, V, T = cv.coords(sl)
    r = np.hypot(U, V)
    rc = np.maximum(rho_c[sl[1], sl[2]][None], 1e-6)
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
        cv.paint(sl, mask, _lab(name), T_LUNG)


# ---------------------------------------------------------------------------------------
# Head and neck
# ---------------------------------------------------------------------------------------
def _head_extent(p):
    lat = 1 + p["scalp"]
    ap_half = p["bh"] + p["scalp"] + 0.03
    return lat, ap_half, 0.0


def _build_head(cv: _Canvas, p: dict, fields: _Fields):
    bh, ch, t_cr, sk, sc = p["bh"], p["ch"], p["t_cr"], p["skull"], p["scalp"]
    na, nb, nf = p["neck_a"], p["neck_b"], p["neck_fat"]
    t_lo = float(cv.T1.min())
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
        cv.ellipsoid((ec[0], ec[1] - 0.13, 0.0), (0.06, 0.035, 0.05), 0.0, _RESERVED, T_LENS)
        cv.ellipsoid(ec, (0.16, 0.16, 0.15), 0.0, _RESERVED, T_EYE)
        cv.ellipsoid((ec[0], ec[1] + 0.05, 0.0), (0.23, 0.27, 0.2), 0.0, _RESERVED, T_FAT)
        cv.ellipsoid((ec[0], ec[1] + 0.08, 0.0), (0.28, 0.3, 0.25), 0.0, _lab("skull"), T_CORT,
                     extra=lambda U, V, T: V > v_eye - 0.05)
        cv.ellipsoid((0.3 * side, -(bh - 0.4), -0.28), (0.16, 0.2, 0.17), 0.0, _RESERVED, T_AIR)
        cv.ellipsoid((0.3 * side, -(bh - 0.4), -0.28), (0.2, 0.24, 0.21), 0.0, _lab("skull"), T_CORT)
    cv.ellipsoid((0, -(bh - 0.25), -0.22), (0.09, 0.34, 0.24), 0.0, _RESERVED, T_AIR)
    cv.ellipsoid((0, -(bh - 0.25), -0.22), (0.13, 0.38, 0.28), 0.0, _lab("skull"), T_CORT)

    # Brain tissue inside the inner table, above the skull base.
    inner = (1 - sk, bh - sk, ch - sk)
    sl = cv.box(-inner[0], inner[0], -inner[1], inner[1], t_cr - inner[2], t_cr + inner[2])
    if sl is not None:
        U, V, T = cv.coords(sl)
        q = np.sqrt((U / inner[0]) ** 2 + (V / inner[1]) ** 2 + ((T - t_cr) / inner[2]) ** 2)
        depth = (1 - q) * 0.95  # approximate depth below the inner table (units)
        cavity = (q < 1) & above_base(U, V, T)
        depth = np.minimum(depth, T - t_base(V))
        brain = _lab("brain")
        cv.paint(sl, cavity, brain, T_WM)
        gyri = fields.new(0.07 * cv.unit, sl)
        cortex = depth < p["csf"] + 0.09 + 0.03 * gyri
        cv.paint(sl, cavity & cortex, brain, T_GM, over=(brain,))
        cv.paint(sl, cavity & (depth < p["csf"] + 0.012 * np.maximum(gyri, 0)), brain, T_CSF, over=(brain,))
        # Cerebellum (posterior fossa) and deep grey matter.
        cv.paint(sl, cavity & (V > 0.3) & (T < t_cr - 0.32), brain, T_GM, over=(brain,))
    vs = p["vent"]
    for side in (1, -1):
        cv.ellipsoid((0.23 * side, -0.05, t_cr + 0.02), (0.1, 0.17, 0.11), 0.0, _lab("brain"), T_GM, over=(_lab("brain"),))
        cv.ellipsoid((0.1 * side, -0.05, t_cr + 0.13), (0.06 * vs, 0.38, 0.1 * vs), 0.15 * side, _lab("brain"), T_CSF,
                     over=(_lab("brain"),))
    cv.ellipsoid((0, 0.0, t_cr + 0.02), (0.018 * vs, 0.12, 0.08), 0.0, _lab("brain"), T_CSF, over=(_lab("brain"),))
    # Brainstem down through the foramen magnum (brain), continuing as the cord.
    cv.tube([(0, 0.05, t_cr - 0.1), (0, v_fm - 0.06, -0.3), (0, v_fm, -0.5)], [0.13, 0.1, 0.08], _lab("brain"), T_WM)

    # Skull: cortical tables with diploe, the skull base as a plate below the cavity floor.
    outer = (1.0, bh, ch)
    sl = cv.box(-1, 1, -bh, bh, t_cr - ch, t_cr + ch)
    if sl is not None:
        U, V, T = cv.coords(sl)
        q = np.sqrt((U / outer[0]) ** 2 + (V / outer[1]) ** 2 + ((T - t_cr) / outer[2]) ** 2)
        hole = (np.hypot(U, V - v_fm) < fm_r) & (T < -0.25)
        shell = (q < 1) & (T > t_base(V) - 0.09) & ~hole
        mid = np.abs(q - (1 - 0.5 * sk / 0.95)) < 0.18 * sk
        cv.paint(sl, shell & mid, _lab("skull"), T_DIPLOE)
        cv.paint(sl, shell, _lab("skull"), T_CORT)

    # -- face: mandible, teeth, maxilla ------------------------------------------------------------
    sl = cv.box(-0.75, 0.75, -bh, 0.3, -0.85, -0.1)
    if sl is not None:
        U, V, T = cv.coords(sl)
        rr = np.hypot(U / 0.62, (V + 0.28) / (bh - 0.4))
        arch = (V < -0.2) & (np.abs(rr - 0.86) < 0.07)
        cv.paint(sl, arch & (T < -0.42) & (T > -0.56), _lab("skull"), T_TEETH)
        cv.paint(sl, arch & (T <= -0.56) & (T > -0.8), _lab("skull"), T_CORT)
        cv.paint(sl, arch & (T >= -0.42) & (T < -0.32), _lab("skull"), T_CORT)
    for side in (1, -1):
        cv.tube([(0.52 * side, -0.2, -0.75), (0.6 * side, 0.02, -0.45), (0.62 * side, 0.02, -0.22)], 0.05,
                _lab("skull"), T_CORT)

    # -- neck: cervical spine, airway, oesophagus, thyroid, vessels, muscles -----------------------
    pC = p["pC"]
    for n in range(1, 8):
        tc = -0.42 - (n - 0.5) * pC
        _paint_vertebra(cv, f"vertebrae_C{n}", tc, pC, v_vb, 0.15, 0.11, 0.1, 0.2, 0.24, 0.062,
                        has_cord=True, has_body=n > 1)
    # cord between the foramen magnum and C1
    cv.tube([(0, v_fm, -0.5), (0, v_vb + 0.11 + 0.1 + 0.012, -0.45)], 0.062, _lab("spinal_cord"), T_CORD)
    # Airway: nasopharynx, oropharynx, larynx (body tissue), trachea.
    airway = [(0, -(bh - 0.55), -0.22), (0, -0.12, -0.3), (0, -0.1, -0.62), (0, -0.2, -0.85), (0, -0.24, -1.0)]
    cv.tube(airway, [0.08, 0.09, 0.08, 0.07, 0.09], _RESERVED, T_AIR)
    sl = cv.box(-0.2, 0.2, -0.45, 0.0, -0.95, -0.6)
    if sl is not None:
        U, V, T = cv.coords(sl)
        rr = np.hypot(U / 0.16, (V + 0.2) / 0.14)
        cv.paint(sl, (rr > 0.8) & (rr < 1.0), _RESERVED, T_CARTILAGE)
    cv.hollow_tube([(0, -0.24, -0.98), (0, -0.24, t_lo - 0.2)], 0.11, 0.02, _lab("trachea"), T_CARTILAGE, T_AIR)
    cv.tube([(0.03, v_vb - 0.11 - 0.07, -0.8), (0.04, v_vb - 0.11 - 0.07, t_lo - 0.2)], 0.065, _lab("esophagus"),
            T_GUTWALL)
    ts = p["thyroid"]
    t_thy = -1.08
    for side in (1, -1):
        cv.ellipsoid((0.2 * side, -0.2, t_thy), (0.1 * ts, 0.11 * ts, 0.22 * ts), 0.0, _lab("thyroid_gland"), T_THYROID)
    cv.ellipsoid((0, -0.36, t_thy - 0.08), (0.14, 0.045, 0.06), 0.0, _lab("thyroid_gland"), T_THYROID)
    t_bif = p["t_bif"]
    for side, nm in ((1, "left"), (-1, "right")):
        cv.tube([(0.33 * side, -0.08, t_lo - 0.2), (0.33 * side, -0.06, t_bif)], 0.055,
                _lab(f"common_carotid_artery_{nm}"), T_ARTERY)
        cv.tube([(0.33 * side, -0.06, t_bif), (0.3 * side, 0.02, -0.25), (0.25 * side, 0.0, -0.1)], 0.045,
                _RESERVED, T_ARTERY)
        cv.tube([(0.47 * side, -0.02, t_lo - 0.2), (0.45 * side, 0.05, -0.5), (0.42 * side, 0.12, -0.2)], 0.07,
                _RESERVED, T_VEIN)
        # sternocleidomastoid in a fat plane
        scm = [(0.6 * side, 0.32, -0.28), (0.52 * side, -0.12, -0.9), (0.22 * side, -0.45, -1.55)]
        cv.tube(scm, 0.13, BODY, T_FAT, extra=lambda U, V, T: T < -0.15)
        cv.tube(scm, 0.095, BODY, T_MUSCLE, extra=lambda U, V, T: T < -0.15)
        # posterior triangle fat
        cv.ellipsoid((0.48 * side, 0.4, -0.9), (0.14, 0.12, 0.4), 0.0, BODY, T_FAT)


# ---------------------------------------------------------------------------------------
# Image synthesis
# ---------------------------------------------------------------------------------------
def _render(cv: _Canvas, p: dict, tex_fields: _Fields, hu_table: np.ndarray) -> np.ndarray:
    """Tissue map -> clean HU: mean values, per-tissue texture, lung and liver vessels."""
    tissue = cv.tissue
    hu = hu_table[tissue]
    min_sp = min(cv.spacing)
    coarse = tex_fields.new(max(0.12 * cv.unit, 2.0 * min_sp))
    hu += _TEXTURE[tissue, 0] * coarse
    del coarse
    fine = tex_fields.new(max(0.035 * cv.unit, 1.3 * min_sp))
    hu += _TEXTURE[tissue, 1] * fine
    del fine
    # Vessel trees: tubes where two band-limited fields are both near zero.
    vessel_tis = [T_LUNG, T_LIVER]
    present = np.isin(tissue, vessel_tis)
    if present.any():
        kk, jj, ii = np.nonzero(present)
        sl = (slice(kk.min(), kk.max() + 1), slice(jj.min(), jj.max() + 1), slice(ii.min(), ii.max() + 1))
        cell = max(0.06 * cv.unit, 1.6 * min_sp)
        f1 = tex_fields.new(cell, sl)
        f2 = tex_fields.new(cell, sl)
        tis = tissue[sl]
        U, V, T = cv.coords(sl)
        # Vessels are thicker and denser near the hila (trunk frame, about carina level).
        hil = np.minimum(np.sqrt((np.abs(U) - 0.3) ** 2 + (V + 0.02) ** 2 + ((T - 1.3) / 1.5) ** 2), 3.0)
        width = np.clip(0.27 - 0.1 * hil, 0.1, 0.27)
        tube = np.exp(-(f1 * f1 + f2 * f2) / (2 * width * width))
        sub = hu[sl]
        lung = tis == T_LUNG
        vessel_hu = hu_table[T_ARTERY] if p["contrast"] else 40.0
        strength = np.clip(1.15 - 0.5 * hil, 0.35, 1.0)
        sub += np.where(lung, (vessel_hu - hu_table[T_LUNG]) * tube * strength + 30.0 * np.clip(V, -0.6, 0.6), 0.0)
        liver_vessel = (hu_table[T_VEIN] + 10 if p["contrast"] else 42.0) - hu_table[T_LIVER]
        sub += np.where(tis == T_LIVER, liver_vessel * np.exp(-(f1 * f1 + f2 * f2) / (2 * 0.12 ** 2)), 0.0)
    # Partial-volume smoothing of the boundaries (about 0.6 voxel).
    return ndimage.gaussian_filter(hu.astype(np.float32), 0.6, mode="nearest").astype(np.float32)


def _noise_kernel_var(sigma: float) -> float:
    """Sum of squared weights of scipy's 1-D Gaussian kernel (truncate = 4)."""
    if sigma <= 0:
        return 1.0
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return float(np.sum(w * w))


def add_ct_noise(hu: np.ndarray, noise_hu: float, seed: int, spacing_kji=(1.0, 1.0, 1.0),
                 correlation_mm: float = 0.7) -> np.ndarray:
    """Add spatially correlated Gaussian noise, like the noise in a reconstructed CT image.

    White Gaussian noise is smoothed with a Gaussian of ``correlation_mm`` (per axis, in
    voxels ``correlation_mm / spacing``) and rescaled so its standard deviation is exactly
    ``noise_hu`` in expectation.

    Args:
        hu: (k, j, i) image in HU.
        noise_hu: noise standard deviation in HU; 0 returns a float32 copy.
        seed: noise seed (non-negative int).
        spacing_kji: voxel size in mm along (k, j, i).
        correlation_mm: Gaussian smoothing sigma of the noise, mm (0 = white noise).

    Returns:
        New float32 array of the same shape.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3-D (k, j, i) array, got shape {hu.shape}")
    spacing = _check_spacing(spacing_kji)
    seed = _check_seed(seed)
    if not (math.isfinite(noise_hu) and noise_hu >= 0):
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
    if correlation_mm < 0:
        raise ValueError(f"correlation_mm must be >= 0, got {correlation_mm}")
    out = hu.astype(np.float32, copy=True)
    if noise_hu == 0:
        return out
    noise = _rng(seed, 7).standard_normal(hu.shape, dtype=np.float32)
    sigmas = [correlation_mm / s if correlation_mm > 0 else 0.0 for s in spacing]
    # Sigmas below ~0.3 voxel barely correlate anything; skip them to keep the kernel exact.
    sigmas = [s if s >= 0.3 else 0.0 for s in sigmas]
    if any(sigmas):
        noise = ndimage.gaussian_filter(noise, sigmas, mode="wrap")
        var = np.prod([_noise_kernel_var(s) for s in sigmas])
        noise *= np.float32(1.0 / math.sqrt(var))
    out += np.float32(noise_hu) * noise
    return out


# ---------------------------------------------------------------------------------------
# Lesions
# ---------------------------------------------------------------------------------------
def insert_lesions(target, n: int, seed: int, *, spacing_kji=None, organs: Sequence[str] | None = None,
                   region: str | None = None, radius_mm: tuple[float, float] | None = None,
                   contrast_hu: tuple[float, float] = (25.0, 80.0), sign: int | None = None,
                   kinds: Iterable[str] = ("round", "irregular"), label_names=None):
    """Insert ``n`` lesions into organs.

    A lesion is a round (ellipsoid) or irregular (lobulated, union of blobs) region centred
    deep enough inside an organ; its mask is clipped to that organ, so organ labels stay as
    they are and ``lesion_mask`` is True exactly where HU changed by at least half the
    contrast. Outside the lung the lesion shifts the organ's HU by ``sign * contrast`` with
    ``contrast`` uniform in ``contrast_hu`` (hypo- or hyper-dense, random sign unless
    ``sign`` is given), with a soft partial-volume edge and mild internal texture. In the
    lung a lesion is a solid nodule of 0 to 40 HU whatever ``sign``.

    Args:
        target: a :class:`Phantom`, or a tuple ``(hu, labels)`` of (k, j, i) arrays.
        n: number of lesions (0 allowed).
        seed: lesion seed (non-negative int).
        spacing_kji: voxel size in mm (k, j, i); taken from the phantom when not given,
            else defaults to 1 mm.
        organs: TotalSegmentator names allowed to hold lesions; default per ``region``
            (:data:`LESION_ORGANS`), or all those organs present when the region is unknown.
        region: region name, for the default organs (a phantom brings its own).
        radius_mm: (min, max) radius in mm; default 2.5 % to 7.5 % of the smaller in-plane
            field of view (3 to 10 mm in a 128 mm field of view), at least 1.5 voxels.
        contrast_hu: (min, max) absolute HU change outside the lung.
        sign: +1 hyperdense, -1 hypodense, None random per lesion.
        kinds: shapes to draw from: "round", "irregular".
        label_names: value -> name for ``labels``; default TotalSegmentator v2 + body.

    Returns:
        For a phantom, a new :class:`Phantom` (``hu`` and ``clean_hu`` both changed, the noise
        kept; ``lesion_mask`` and ``lesions`` extended). For a tuple, ``(new_hu, mask,
        lesions)``: float32 image, bool mask and a list of :class:`Lesion`.

    Raises:
        ValueError: bad arguments, or no requested organ in the label map.
    """
    phantom = target if isinstance(target, Phantom) else None
    if phantom is not None:
        hu, labels = phantom.clean_hu, phantom.labels
        spacing = phantom.spacing_kji if spacing_kji is None else _check_spacing(spacing_kji)
        region = region or phantom.region  # phantom labels are TotalSegmentator indices
    else:
        try:
            hu, labels = target
        except (TypeError, ValueError) as exc:
            raise ValueError("target must be a Phantom or a (hu, labels) tuple") from exc
        hu, labels = np.asarray(hu), np.asarray(labels)
        spacing = _check_spacing(spacing_kji if spacing_kji is not None else (1.0, 1.0, 1.0))
    if hu.ndim != 3 or hu.shape != labels.shape:
        raise ValueError(f"hu and labels must be 3-D arrays of the same shape, got {hu.shape} and {labels.shape}")
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seed = _check_seed(seed)
    if region is not None and region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    if sign not in (None, 1, -1):
        raise ValueError(f"sign must be +1, -1 or None, got {sign!r}")
    kinds = tuple(kinds)
    if not kinds or any(k not in ("round", "irregular") for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of ('round', 'irregular'), got {kinds}")
    lo_c, hi_c = (float(c) for c in contrast_hu)
    if not (0 <= lo_c <= hi_c):
        raise ValueError(f"contrast_hu must be (min, max) with 0 <= min <= max, got {contrast_hu}")
    names = dict(anatomy.DEFAULT_LABEL_NAMES if label_names is None else label_names)
    by_name = {v: k for k, v in names.items()}
    user_organs = organs is not None
    if organs is None:
        organs = LESION_ORGANS[region] if region is not None else tuple(
            sorted({o for group in LESION_ORGANS.values() for o in group}))
    organs = tuple(organs)
    present = {}
    for name in organs:
        if name not in by_name:
            if user_organs:
                raise ValueError(f"unknown organ {name!r}: not in the label names")
            continue
        count = int(np.count_nonzero(labels == by_name[name]))
        if count:
            present[name] = count
    new_hu = hu.astype(np.float32, copy=True)
    mask_all = np.zeros(hu.shape, bool)
    lesions: list[Lesion] = []
    if n and not present:
        raise ValueError(f"none of the organs {tuple(organs)} is present in the label map")
    sp = np.asarray(spacing, float)
    if radius_mm is None:
        fov = min(hu.shape[1] * sp[1], hu.shape[2] * sp[2])
        floor = 1.5 * float(sp.max())
        radius_mm = (max(0.025 * fov, floor), max(0.075 * fov, floor * 1.5))
    r_lo, r_hi = (float(r) for r in radius_mm)
    if not (0 < r_lo <= r_hi):
        raise ValueError(f"radius_mm must be (min, max) with 0 < min <= max, got {radius_mm}")
    rng = _rng(seed, 11)
    names_list = sorted(present)
    weights = np.sqrt(np.array([present[o] for o in names_list], float))
    weights /= weights.sum()
    for _ in range(n):
        for _attempt in range(20):
            organ = names_list[int(rng.choice(len(names_list), p=weights))]
            radius = float(rng.uniform(r_lo, r_hi))
            kind = kinds[int(rng.integers(len(kinds)))]
            organ_mask = labels == by_name[organ]
            les = _place_lesion(rng, organ_mask & ~mask_all, radius, sp, kind)
            if les is None:
                continue
            sl, soft, centre = les
            in_organ = organ_mask[sl]
            soft = soft * in_organ
            lmask = soft >= 0.5
            if not lmask.any():
                continue
            sub = new_hu[sl]
            tex = rng.standard_normal(soft.shape).astype(np.float32)
            tex = ndimage.gaussian_filter(tex, 1.0)
            tex /= max(float(tex.std()), 1e-6)
            if organ in _LUNG_NAMES:
                target_hu = float(rng.uniform(0.0, 40.0))
                new = target_hu + 8.0 * tex
                delta = (new - sub) * soft
                signed = target_hu - float(np.median(sub[lmask]))
            else:
                s = sign if sign is not None else (1 if rng.random() < 0.5 else -1)
                c = float(rng.uniform(lo_c, hi_c)) * s
                delta = (c + 0.12 * abs(c) * tex) * soft
                signed = c
            sub += delta.astype(np.float32)
            mask_all[sl] |= lmask
            lesions.append(Lesion(center_kji=tuple(float(v) for v in centre), radius_mm=radius, organ=organ,
                                  contrast_hu=signed, kind=kind, voxels=int(lmask.sum())))
            break
    if phantom is None:
        return new_hu, mask_all, lesions
    diff = new_hu - phantom.clean_hu
    return dataclasses.replace(
        phantom, clean_hu=new_hu, hu=(phantom.hu + diff).astype(np.float32),
        lesion_mask=phantom.lesion_mask | mask_all, lesions=list(phantom.lesions) + lesions)


def _place_lesion(rng, organ_mask: np.ndarray, radius: float, sp: np.ndarray, kind: str):
    """Pick a centre deep in the organ and build a soft lesion indicator around it."""
    if not organ_mask.any():
        return None
    kk, jj, ii = np.nonzero(organ_mask)
    lo = np.array([kk.min(), jj.min(), ii.min()])
    hi = np.array([kk.max(), jj.max(), ii.max()]) + 1
    crop = organ_mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    dist = ndimage.distance_transform_edt(np.pad(crop, 1), sampling=sp)[1:-1, 1:-1, 1:-1]
    depth = float(dist.max())
    if depth <= 0:
        return None
    radius = min(radius, max(depth / 0.8, 0.5 * float(sp.min())))
    need = min(0.8 * radius, 0.9 * depth)
    cand = np.flatnonzero(dist.ravel() >= need)
    pick = int(cand[rng.integers(cand.size)])
    centre = np.array(np.unravel_index(pick, crop.shape)) + lo
    centre = centre + rng.uniform(-0.3, 0.3, 3)  # sub-voxel position
    # Box around the centre.
    ext = np.ceil(1.6 * radius / sp).astype(int) + 1
    c0 = np.floor(centre).astype(int)
    a = np.maximum(c0 - ext, 0)
    b = np.minimum(c0 + ext + 1, organ_mask.shape)
    sl = tuple(slice(int(x), int(y)) for x, y in zip(a, b))
    grids = np.meshgrid(*[(np.arange(x, y) - c) * s for x, y, c, s in zip(a, b, centre, sp)], indexing="ij")
    pts = np.stack(grids, -1)  # mm offsets (k, j, i)
    rot = _random_rotation(rng)
    local = pts @ rot.T
    if kind == "round":
        axes = radius * rng.uniform(0.8, 1.2, 3)
        rho = np.sqrt(np.sum((local / axes) ** 2, axis=-1))
        sd = (rho - 1.0) * radius
    else:
        # Lobulated: a radius that varies with direction, unioned with offset blobs.
        dirs = rng.normal(size=(4, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        r = np.linalg.norm(local, axis=-1)
        unit = local / np.maximum(r, 1e-9)[..., None]
        wobble = np.zeros(r.shape)
        for d, amp, freq, ph in zip(dirs, rng.uniform(0.08, 0.2, 4), rng.integers(2, 5, 4), rng.uniform(0, 6.3, 4)):
            wobble += amp * np.cos(freq * (unit @ d) + ph)
        sd = r - radius * (1 + wobble - 0.1)
        for _ in range(int(rng.integers(1, 4))):
            off = rng.normal(size=3)
            off *= radius * rng.uniform(0.4, 0.7) / np.linalg.norm(off)
            rb = radius * rng.uniform(0.45, 0.7)
            sd = np.minimum(sd, np.linalg.norm(local - off, axis=-1) - rb)
    soft = np.clip(0.5 - sd / float(np.mean(sp)), 0.0, 1.0).astype(np.float32)
    return sl, soft, centre


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q


# ---------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------
def make_phantom(region: str, shape_kji=(64, 64, 64), spacing_kji=(1.0, 1.0, 1.0), seed: int = 0, *,
                 lesions: int = 0, noise_hu: float = 12.0, ijk_to_ras: np.ndarray | None = None,
                 fov_fill: float = 0.85, contrast: bool | None = None, noise_correlation_mm: float | None = None,
                 lesion_kwargs: dict | None = None) -> Phantom:
    """Generate a synthetic CT phantom.

    Args:
        region: "head_neck", "chest" or "abdomen".
        shape_kji: (k, j, i) voxel counts, any positive sizes.
        spacing_kji: (k, j, i) voxel size in mm.
        seed: non-negative int; the same arguments give bit-identical output.
        lesions: number of lesions to insert (see :func:`insert_lesions`).
        noise_hu: CT noise standard deviation in HU (0 = clean).
        ijk_to_ras: optional (4, 4) matrix used as given (its column norms must equal the
            spacing); default :func:`default_ijk_to_ras`. It only places the grid in space.
        fov_fill: fraction of the in-plane field of view the body spans (0 < fov_fill <= 1).
        contrast: force iodinated contrast in the blood on/off; None draws it from the seed.
        noise_correlation_mm: noise correlation sigma in mm; default 0.7 x the in-plane spacing.
        lesion_kwargs: extra keyword arguments for :func:`insert_lesions`.

    Returns:
        A :class:`Phantom`. ``labels`` is uint8 (TotalSegmentator v2 values + 255 body),
        ``hu``/``clean_hu`` float32 HU.

    Raises:
        ValueError: unknown region, shape not three positive ints, non-positive spacing,
            a matrix that does not match the spacing, or another bad argument.
    """
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    shape = _check_shape(shape_kji)
    spacing = _check_spacing(spacing_kji)
    seed = _check_seed(seed)
    if not (0 < float(fov_fill) <= 1):
        raise ValueError(f"fov_fill must be in (0, 1], got {fov_fill}")
    if not (math.isfinite(noise_hu) and noise_hu >= 0):
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
    lesions = operator.index(lesions)
    if lesions < 0:
        raise ValueError(f"lesions must be >= 0, got {lesions}")
    matrix = default_ijk_to_ras(shape, spacing) if ijk_to_ras is None else _check_matrix(ijk_to_ras, spacing)

    rng = _rng(seed, 1)
    p = _common_params(rng)
    p.update(_trunk_params(rng) if region != "head_neck" else _head_params(rng))
    if contrast is not None:
        p["contrast"] = bool(contrast)
    lat, ap_half, ap_centre = _trunk_extent(p) if region != "head_neck" else _head_extent(p)
    fov_i = shape[2] * spacing[2]
    fov_j = shape[1] * spacing[1]
    unit = float(fov_fill) * min(fov_i / 2 / lat, fov_j / 2 / ap_half)
    t0 = (_TRUNK_CENTRE.get(region, 0.0)) + p["t_shift"]
    cv = _Canvas(shape, spacing, unit, t0, p["angle"], p["shift_u"], ap_centre + p["shift_v"])
    axes = (cv.z, cv.y, cv.x)
    extent = tuple(n * s for n, s in zip(shape, spacing))
    shape_fields = _Fields(axes, extent, _rng(seed, 2))
    if region == "head_neck":
        _build_head(cv, p, shape_fields)
    else:
        _build_trunk(cv, p, shape_fields)
    cv.labels[cv.labels == _RESERVED] = BODY

    hu_table = _tissue_hu(p)
    clean = _render(cv, p, _Fields(axes, extent, _rng(seed, 3)), hu_table)
    labels = cv.labels
    present = np.unique(labels)
    label_names = {int(v): anatomy.DEFAULT_LABEL_NAMES[int(v)] for v in present if v != 0}
    phantom = Phantom(hu=clean, labels=labels, label_names=label_names, lesion_mask=np.zeros(shape, bool),
                      ijk_to_ras=matrix, region=region, clean_hu=clean, contrast=p["contrast"])
    if lesions:
        phantom = insert_lesions(phantom, lesions, seed, **(lesion_kwargs or {}))
    corr = 0.7 * min(spacing[1], spacing[2]) if noise_correlation_mm is None else float(noise_correlation_mm)
    noisy = add_ct_noise(phantom.clean_hu, noise_hu, seed, spacing, corr)
    return dataclasses.replace(phantom, hu=noisy)
