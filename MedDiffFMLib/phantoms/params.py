"""Argument checks, random streams, the variation switches and the per-seed parameters.

Every random number comes from ``numpy.random.default_rng([seed, stream])`` (or, for the
smooth fields, from a hash of ``(seed, stream, counter)``), so the same arguments always give
bit-identical output. Parameters are always drawn in the same order; a variation that is
switched off replaces its draws by the middle of their ranges, so turning one switch off
changes only what that switch covers.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, fields

import numpy as np

from .tissues import PHASES

REGIONS = ("head_neck", "chest", "abdomen")

# Random streams (one per purpose).
STREAM_PARAMS, STREAM_ANATOMY, STREAM_TEXTURE, STREAM_NOISE, STREAM_LESIONS, STREAM_CASE = 1, 2, 3, 7, 11, 13


@dataclass(frozen=True)
class Variation:
    """Which kinds of seed-drawn variation a phantom gets (all on by default).

    Attributes:
        deformation: a smooth random displacement of the anatomy (two scales, a few mm).
        organs: organ shape, size and position, and the patient's pose in the field of view.
        habitus: body size and build (fat layers, cavity shape, head shape).
        texture: tissue texture at three scales and the spread of tissue HU between patients.
        partial_volume: each voxel averages its in-plane footprint (sub-samples on coarse
            pixels, then an in-plane point-spread of 0.5 pixel), instead of a point sample.
        slab_profile: each voxel averages its slab along k (sub-samples along k), instead of
            a point sample at the slice centre.
        contrast_phase: a contrast phase drawn from :data:`~.tissues.PHASES`; off gives
            non-contrast CT (unless the phase is given).
    """

    deformation: bool = True
    organs: bool = True
    habitus: bool = True
    texture: bool = True
    partial_volume: bool = True
    slab_profile: bool = True
    contrast_phase: bool = True

    @classmethod
    def none(cls) -> "Variation":
        """Every variation off: the nominal phantom, point-sampled."""
        return cls(**{f.name: False for f in fields(cls)})


def rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


class Draw:
    """Uniform draws that fall back to the middle of their range when ``vary`` is off."""

    def __init__(self, generator: np.random.Generator):
        self.rng = generator

    def __call__(self, lo: float, hi: float, vary: bool) -> float:
        value = float(self.rng.uniform(lo, hi))
        return value if vary else 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------
def check_shape(shape_kji) -> tuple[int, int, int]:
    try:
        shape = tuple(operator.index(s) for s in shape_kji)
    except TypeError as exc:
        raise ValueError(f"shape_kji must be three positive integers, got {shape_kji!r}") from exc
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape_kji must be three positive integers (k, j, i), got {shape_kji!r}")
    return shape  # type: ignore[return-value]


def check_spacing(spacing_kji) -> tuple[float, float, float]:
    try:
        spacing = tuple(float(s) for s in spacing_kji)
    except TypeError as exc:
        raise ValueError(f"spacing_kji must be three positive numbers (mm), got {spacing_kji!r}") from exc
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_kji must be three positive finite numbers (mm), got {spacing_kji!r}")
    return spacing  # type: ignore[return-value]


def check_seed(seed) -> int:
    try:
        seed = operator.index(seed)
    except TypeError as exc:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}") from exc
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return seed


def check_region(region) -> str:
    if region not in REGIONS:
        raise ValueError(f"unknown region {region!r}; expected one of {REGIONS}")
    return region


def check_phase(phase) -> str | None:
    if phase is not None and phase not in PHASES:
        raise ValueError(f"unknown contrast phase {phase!r}; expected one of {PHASES}")
    return phase


def check_matrix(ijk_to_ras, spacing) -> np.ndarray:
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
# Parameters drawn per seed (anatomy-frame units unless stated)
# ---------------------------------------------------------------------------------------
def common_params(generator: np.random.Generator, var: Variation) -> dict:
    d = Draw(generator)
    tex, org = var.texture, var.organs
    phase = PHASES[int(generator.integers(len(PHASES)))]  # drawn always: later draws keep their place
    p = {
        "phase": phase if var.contrast_phase else "native",
        "blood_u": d(0.0, 1.0, var.contrast_phase),
        "hu_lung": d(-890, -855, tex),
        "hu_fat": d(-110, -85, tex),
        "hu_muscle": d(42, 58, tex),
        "hu_liver": d(55, 65, tex),
        "hu_spleen": d(45, 55, tex),
        "hu_canc": d(170, 290, tex),
        "hu_cort": d(750, 1150, tex),
        "hu_gm": d(35, 40, tex),
        "texture_gain": (d(0.7, 1.4, tex), d(0.6, 1.5, tex), d(0.6, 1.5, tex)),
        "angle": d(-0.07, 0.07, org),  # in-plane rotation, rad (~ +-4 degrees)
        "shift_u": d(-0.03, 0.03, org),
        "shift_v": d(-0.03, 0.03, org),
        "t_shift": d(-0.08, 0.08, org),
        # displacement std (units) at two scales: ~2-6 mm and ~1-2.5 mm on an adult trunk
        "deform": (d(0.015, 0.045, var.deformation), d(0.006, 0.02, var.deformation)),
    }
    return p


def trunk_params(generator: np.random.Generator, var: Variation) -> dict:
    d = Draw(generator)
    org, hab = var.organs, var.habitus
    s = d(0.93, 1.07, org)
    return {
        "unit_mm": d(112.0, 150.0, hab),  # cavity half-width: body size
        "bc": d(0.62, 0.76, hab),  # cavity AP / lateral half-width
        "m": d(0.045, 0.07, hab),  # muscle wall
        "f": d(0.04, 0.28, hab),  # subcutaneous fat: slim .. obese
        "pT": 0.19 * s, "pL": 0.28 * s, "pC": 0.13 * s,
        "vb_scale": d(0.9, 1.1, org),
        "t_dR": d(0.45, 0.65, org),  # right diaphragm dome; lower dome = larger lungs
        "dL": d(0.04, 0.11, org),
        "heart_scale": d(0.85, 1.15, org), "heart_u": d(0.04, 0.17, org), "heart_angle": d(-0.7, -0.3, org),
        "heart_dv": d(-0.04, 0.04, org),
        "arch_t": d(1.72, 1.88, org), "aorta_scale": d(0.85, 1.2, org), "t_bif": d(-1.1, -0.88, org),
        "liver_scale": d(0.85, 1.15, org), "liver_du": d(-0.05, 0.05, org), "liver_dv": d(-0.04, 0.04, org),
        "spleen_scale": d(0.75, 1.25, org), "spleen_dt": d(-0.08, 0.08, org),
        "kidney_scale": d(0.85, 1.12, org), "kidney_dt": d(-0.14, 0.14, org), "kidney_r_lower": d(0.02, 0.2, org),
        "kidney_du": d(-0.04, 0.04, org),
        "stomach_level": d(-0.6, 0.05, org), "stomach_scale": d(0.8, 1.2, org),
        "colon_gas": d(-0.2, 1.2, org), "colon_r": d(0.09, 0.15, org), "bowel_fill": d(0.85, 1.3, org),
        "crest_t": d(-1.25, -1.05, org),
        "gall": d(0.6, 1.3, org),
    }


def head_params(generator: np.random.Generator, var: Variation) -> dict:
    d = Draw(generator)
    org, hab = var.organs, var.habitus
    return {
        "unit_mm": d(66.0, 80.0, hab),  # cranium half-width
        "bh": d(1.1, 1.3, hab),  # cranium AP / lateral half-width
        "ch": d(0.8, 0.9, hab),  # cranium height above its centre
        "t_cr": d(0.4, 0.5, org),
        "skull": d(0.07, 0.1, hab),
        "scalp": d(0.05, 0.1, hab),
        "csf": d(0.01, 0.05, org),  # subarachnoid CSF (atrophy with age)
        "vent": d(0.7, 1.5, org),
        "neck_a": d(0.66, 0.8, hab), "neck_b": d(0.62, 0.75, hab), "neck_fat": d(0.04, 0.14, hab),
        "pC": d(0.15, 0.17, org),
        "t_bif": d(-0.62, -0.48, org),
        "thyroid": d(0.75, 1.25, org),
    }


# Where each region's field of view is centred on the body axis (anatomy-frame T).
REGION_CENTRE_T = {"chest": 1.15, "abdomen": -0.65, "head_neck": 0.0}
# How far along the body axis (T) each region's anatomy is modelled: a sub-box is drawn inside.
REGION_T_RANGE = {"chest": (0.3, 2.35), "abdomen": (-1.7, 0.5), "head_neck": (-1.3, 1.45)}


def trunk_extent(p: dict) -> tuple[float, float, float]:
    """(lateral half-extent, AP half-extent, AP centre) of the trunk in trunk units."""
    lat = 1 + p["m"] + p["f"]
    ant = p["bc"] + p["m"] + 1.25 * p["f"]
    post = p["bc"] + p["m"] + 0.6 * p["f"]
    return lat, (ant + post) / 2, (post - ant) / 2


def head_extent(p: dict) -> tuple[float, float, float]:
    """(lateral half-extent, AP half-extent, AP centre) of the head in head units."""
    return 1 + p["scalp"], p["bh"] + p["scalp"] + 0.03, 0.0


def region_params(region: str, seed: int, var: Variation) -> dict:
    """All seed-drawn parameters of one phantom (stream :data:`STREAM_PARAMS`)."""
    generator = rng(seed, STREAM_PARAMS)
    p = common_params(generator, var)
    p.update(head_params(generator, var) if region == "head_neck" else trunk_params(generator, var))
    return p
