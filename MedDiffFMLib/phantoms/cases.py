"""Training cases: one random phantom on a random clinical grid, drawn fast.

:func:`training_phantom` draws, from one seed, a region, an anisotropic voxel size, an
oblique direction and a sub-box of an adult-sized body with a bounded number of samples, and
returns the noise-free phantom on that grid (noise is added by the caller, see
:func:`~.noise.add_ct_noise`).

Generation time, measured with ``OMP_NUM_THREADS=1 python -m MedDiffFMLib.phantoms.cases``
(30 cases, default budgets: at most 64^3 voxels and 2 x 64^3 sub-samples, median case 55^3
voxels) on the 2-core development machine while it ran other jobs (load ~10): median 0.34 s
of CPU time per case, at most 0.71 s (wall 0.82 s median, 1.7 s at most under that load).
A full 64^3 grid at 1 mm takes about 0.32 s of CPU time; 64^3 at 2.5 x 0.8 x 0.8 mm (three
sub-samples per slab) about 0.56 s.
"""

from __future__ import annotations

import math

import numpy as np

from .lesions import LESION_ORGANS, insert_lesions
from .make import make_phantom
from .params import (REGION_CENTRE_T, REGION_T_RANGE, REGIONS, STREAM_CASE, Variation, check_region, check_seed,
                     check_shape, check_spacing, head_extent, region_params, rng, trunk_extent)
from .render import sampling_factors
from .types import Phantom

SPACING_RANGE_MM = (0.5, 5.0)
LESION_DIAMETER_MM = (3.0, 30.0)
MIN_SIDE = 16  # voxels along each axis, at least
_BASE_DIRECTIONS = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]]).T  # columns i, j, k


def _log_uniform(g: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(g.uniform(math.log(lo), math.log(hi))))


def draw_spacing(g: np.random.Generator) -> tuple[float, float, float]:
    """(k, j, i) mm: in-plane and slice drawn separately; slices are usually thicker.

    In-plane: mostly clinical 0.5-1.2 mm (70 %), else anywhere in 0.5-5 mm; square pixels
    85 % of the time. Slices: 75 % at least as thick as the pixels (up to 5 mm), else
    anywhere in 0.5-5 mm.
    """
    lo, hi = SPACING_RANGE_MM
    s_i = _log_uniform(g, lo, 1.2) if g.random() < 0.7 else _log_uniform(g, lo, hi)
    s_j = s_i if g.random() < 0.85 else _log_uniform(g, lo, hi)
    s_k = _log_uniform(g, max(s_i, s_j), hi) if g.random() < 0.75 else _log_uniform(g, lo, hi)
    return s_k, s_j, s_i


def draw_direction(g: np.random.Generator, max_tilt_deg: float = 30.0) -> np.ndarray:
    """(3, 3) direction cosines (columns i, j, k in RAS): an axial series tilted about a
    random axis by up to ``max_tilt_deg`` (70 % of cases; the others are axial)."""
    if g.random() >= 0.7:
        return _BASE_DIRECTIONS.copy()
    axis = g.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = math.radians(g.uniform(2.0, max_tilt_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)  # Rodrigues
    return rot @ _BASE_DIRECTIONS


def training_phantom(seed: int, region: str | None = None, spacing_kji=None, shape_kji=None, *,
                     max_voxels: int = 64 ** 3, max_samples: int = 2 * 64 ** 3, lesions: int | None = None,
                     variation: Variation | None = None) -> Phantom:
    """Draw one noise-free training case.

    Args:
        seed: non-negative int; everything below is drawn from it unless given.
        region: one of :data:`REGIONS`; None draws one.
        spacing_kji: (k, j, i) mm; None draws an anisotropic one in 0.5-5 mm
            (:func:`draw_spacing`).
        shape_kji: (k, j, i) voxels; None sizes the field of view to the body, cut to a
            random sub-box so that it holds at most ``max_voxels`` voxels and
            ``max_samples`` sub-samples (the slab and footprint sub-samples cost time).
        max_voxels / max_samples: the budgets used when ``shape_kji`` is None.
        lesions: number of lesions (3-30 mm across, hypo- or hyperdense, round or lobulated);
            None draws 0-3 (none half of the time). Fewer land when the box holds little of
            the region's lesion organs.
        variation: passed to :func:`~.make.make_phantom` (default: all variation on).

    Returns:
        A :class:`Phantom` on an oblique grid (``hu`` equals ``clean_hu``).
    """
    seed = check_seed(seed)
    if min(max_voxels, max_samples) < MIN_SIDE ** 3:
        raise ValueError(f"max_voxels and max_samples must be at least {MIN_SIDE ** 3} ({MIN_SIDE}^3), "
                         f"got {max_voxels} and {max_samples}")
    g = rng(seed, STREAM_CASE)
    drawn_region = REGIONS[int(g.integers(len(REGIONS)))]
    region = drawn_region if region is None else check_region(region)
    drawn_spacing = draw_spacing(g)
    spacing = drawn_spacing if spacing_kji is None else check_spacing(spacing_kji)
    directions = draw_direction(g)
    var = Variation() if variation is None else variation
    p = region_params(region, seed, var)
    lat, ap_half, _ = head_extent(p) if region == "head_neck" else trunk_extent(p)
    t_lo, t_hi = REGION_T_RANGE[region]
    unit = p["unit_mm"]
    body_mm = np.array([(t_hi - t_lo) * unit, 2 * ap_half * unit * 1.05, 2 * lat * unit * 1.05])  # k, j, i
    if shape_kji is None:
        factors = np.prod(sampling_factors(spacing, var))
        budget = min(max_voxels, max(MIN_SIDE ** 3, max_samples // factors))
        full = np.maximum(np.ceil(body_mm / np.array(spacing)), MIN_SIDE)
        shrink = min(1.0, (budget / np.prod(full)) ** (1 / 3))
        shape = tuple(int(v) for v in np.maximum(np.floor(full * shrink), MIN_SIDE))
        while np.prod(shape) > budget:  # the floor of MIN_SIDE may overshoot: trim the largest side
            shape = tuple(s - (1 if s == max(shape) and s > MIN_SIDE else 0) for s in shape)
            if all(s == MIN_SIDE for s in shape):
                break
    else:
        shape = check_shape(shape_kji)
    # Centre: a random point of the body such that the box stays over it where it can.
    fov = np.array(shape) * np.array(spacing)
    room = np.maximum(body_mm - fov, 0.0) / 2
    u = g.uniform(-1, 1, 3)
    t_mid = ((t_lo + t_hi) / 2 - REGION_CENTRE_T[region]) * unit
    centre_ras = np.array([-u[2] * room[2], -u[1] * room[1], t_mid + u[0] * room[0]])
    matrix = np.eye(4)
    matrix[:3, :3] = directions * np.array(spacing[::-1])
    centre_ijk = (np.array(shape[::-1], float) - 1) / 2
    matrix[:3, 3] = centre_ras - matrix[:3, :3] @ centre_ijk
    n_drawn = int(g.integers(1, 4)) if g.random() < 0.5 else 0
    n_lesions = n_drawn if lesions is None else int(lesions)
    ph = make_phantom(region, shape, spacing, seed, ijk_to_ras=matrix, fov_fill=None, noise_hu=0.0,
                      variation=var)
    names = set(ph.label_names.values())
    if n_lesions and any(o in names for o in LESION_ORGANS[region]):
        ph = insert_lesions(ph, n_lesions, seed, radius_mm=tuple(d / 2 for d in LESION_DIAMETER_MM),
                            contrast_hu=(10.0, 80.0))
    return ph


def _time_cases(argv: list[str] | None = None) -> None:
    """Print the generation time of training cases: ``python -m MedDiffFMLib.phantoms.cases``."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Time training_phantom on this machine (one thread).")
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--max-voxels", type=int, default=64 ** 3)
    parser.add_argument("--max-samples", type=int, default=2 * 64 ** 3)
    parser.add_argument("--first-seed", type=int, default=1000)
    args = parser.parse_args(argv)
    training_phantom(args.first_seed - 1, max_voxels=16 ** 3)  # warm-up (imports, caches)
    seconds, cpu, voxels = [], [], []
    for seed in range(args.first_seed, args.first_seed + args.cases):
        t0, c0 = time.perf_counter(), time.process_time()
        ph = training_phantom(seed, max_voxels=args.max_voxels, max_samples=args.max_samples)
        seconds.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        voxels.append(ph.hu.size)
        sk, sj, si = ph.spacing_kji
        print(f"seed {seed}: {ph.region:9s} {str(ph.hu.shape):15s} {sk:.2f} x {sj:.2f} x {si:.2f} mm "
              f"{ph.phase:13s} {len(ph.lesions)} lesions  {seconds[-1]:.3f} s wall, {cpu[-1]:.3f} s cpu")
    s, c, v = np.array(seconds), np.array(cpu), np.array(voxels)
    print(f"{len(s)} cases: wall median {np.median(s):.3f} s, max {s.max():.3f} s; cpu median {np.median(c):.3f} s, "
          f"max {c.max():.3f} s; median {np.median(v):.0f} voxels ({np.median(v) ** (1 / 3):.0f}^3)")


if __name__ == "__main__":
    _time_cases()
