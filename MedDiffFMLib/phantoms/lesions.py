"""Lesions: round or lobulated, hypo- or hyperdense, inside organs, with an exact mask."""

from __future__ import annotations

import dataclasses
import operator
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .. import anatomy
from .params import REGIONS, STREAM_LESIONS, check_seed, check_spacing
from .params import rng as stream_rng
from .types import Lesion, Phantom

# Organs that receive lesions by default, per region (TotalSegmentator names).
LESION_ORGANS: dict[str, tuple[str, ...]] = {
    "abdomen": ("liver", "spleen", "kidney_left", "kidney_right"),
    "chest": ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right",
              "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "head_neck": ("brain", "thyroid_gland"),
}
_LUNG_NAMES = frozenset(LESION_ORGANS["chest"])


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
    lung a lesion is a solid nodule of 0 to 40 HU whatever ``sign``. Along k the lesion is
    averaged through each slab (sub-samples as fine as the pixels), so on thick slices a
    small lesion is faint and its mask holds the voxels it fills at least half of.

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
        spacing = phantom.spacing_kji if spacing_kji is None else check_spacing(spacing_kji)
        region = region or phantom.region  # phantom labels are TotalSegmentator indices
    else:
        try:
            hu, labels = target
        except (TypeError, ValueError) as exc:
            raise ValueError("target must be a Phantom or a (hu, labels) tuple") from exc
        hu, labels = np.asarray(hu), np.asarray(labels)
        spacing = check_spacing(spacing_kji if spacing_kji is not None else (1.0, 1.0, 1.0))
    if hu.ndim != 3 or hu.shape != labels.shape:
        raise ValueError(f"hu and labels must be 3-D arrays of the same shape, got {hu.shape} and {labels.shape}")
    n = operator.index(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seed = check_seed(seed)
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
    rng = stream_rng(seed, STREAM_LESIONS)
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
            sl, soft, centre, radius = les  # the radius shrinks to fit a thin organ
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
            ras = None
            if phantom is not None:
                ras = tuple(float(v) for v in (phantom.ijk_to_ras @ np.array([*centre[::-1], 1.0]))[:3])
            lesions.append(Lesion(center_kji=tuple(float(v) for v in centre), radius_mm=radius, organ=organ,
                                  contrast_hu=signed, kind=kind, voxels=int(lmask.sum()), center_ras=ras))
            break
    if phantom is None:
        return new_hu, mask_all, lesions
    diff = new_hu - phantom.clean_hu
    return dataclasses.replace(
        phantom, clean_hu=new_hu, hu=(phantom.hu + diff).astype(np.float32),
        lesion_mask=phantom.lesion_mask | mask_all, lesions=list(phantom.lesions) + lesions)


def _place_lesion(rng, organ_mask: np.ndarray, radius: float, sp: np.ndarray, kind: str):
    """Pick a centre deep in the organ and build a soft lesion indicator around it.

    Returns:
        ``(box, soft, centre_kji, radius_mm)`` or None when the organ has no room.
    """
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
    if kind == "round":
        axes = radius * rng.uniform(0.8, 1.2, 3)

        def signed_distance(local):
            return (np.sqrt(np.sum((local / axes) ** 2, axis=-1)) - 1.0) * radius
    else:
        # Lobulated: a radius that varies with direction, unioned with offset blobs.
        dirs = rng.normal(size=(4, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        waves = list(zip(dirs, rng.uniform(0.08, 0.2, 4), rng.integers(2, 5, 4), rng.uniform(0, 6.3, 4)))
        blobs = []
        for _ in range(int(rng.integers(1, 4))):
            off = rng.normal(size=3)
            off *= radius * rng.uniform(0.4, 0.7) / np.linalg.norm(off)
            blobs.append((off, radius * rng.uniform(0.45, 0.7)))

        def signed_distance(local):
            r = np.linalg.norm(local, axis=-1)
            unit = local / np.maximum(r, 1e-9)[..., None]
            wobble = np.zeros(r.shape)
            for d, amp, freq, ph in waves:
                wobble += amp * np.cos(freq * (unit @ d) + ph)
            sd = r - radius * (1 + wobble - 0.1)
            for off, rb in blobs:
                sd = np.minimum(sd, np.linalg.norm(local - off, axis=-1) - rb)
            return sd

    # Partial volume: the edge is soft over one in-plane pixel, and along k the indicator is
    # averaged over sub-samples through the slab (a thick slice sees a thin lesion faintly).
    edge = float(np.mean(sp[1:]))
    n_sub = min(7, max(1, int(np.ceil(sp[0] / max(float(sp[1:].min()), 1e-9)))))
    n_sub += 1 - n_sub % 2
    soft = np.zeros(pts.shape[:-1], np.float32)
    for q in range(n_sub):
        shift = np.array([((q + 0.5) / n_sub - 0.5) * sp[0], 0.0, 0.0])
        soft += np.clip(0.5 - signed_distance((pts + shift) @ rot.T) / edge, 0.0, 1.0).astype(np.float32)
    return sl, soft / n_sub, centre, radius


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))
    return q

