"""An independent held-out family of CT-like phantoms, for evaluation only.

Built by different code from different primitives than the training phantoms
(:mod:`MedDiffFMLib.phantoms`, which this package never imports): organs are star-shaped
blobs with low-frequency radial harmonics, superquadrics and metaballs in a smoothly
deformed space; bones are cortical shells over marrow; vessels and airways are tubes along
cubic splines, ribs tubes along tilted elliptic arcs; texture is a sum of random plane waves
at three scales; CT noise has a filtered-back-projection power spectrum. The phantom is
continuous: :func:`make_heldout_case` renders it on any grid (oblique, anisotropic) with a
slab slice profile, so a model can be measured at clinical voxel sizes.

Labels are TotalSegmentator v2 class values (``anatomy.TOTALSEGMENTATOR_V2``), 255 for body
tissue no class claims, 0 for air. Seeds: any non-negative integer; the same seed gives the
same anatomy with or without lesions, bit for bit on one machine.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence

import numpy as np

from .builder import PHASES, Builder
from .lesions import add_lesions
from .noise import add_ct_noise, ct_noise
from .plan import PhantomPlan
from .regions import FOCUS_RAS, LESION_ORGANS, RECIPES
from .render import RenderedPhantom, evaluate_points, render_plan, samples_for_spacing, subsample_offsets
from .texture import draw_texture

REGIONS = tuple(RECIPES)

__all__ = ["REGIONS", "LESION_ORGANS", "PhantomPlan", "RenderedPhantom", "plan_phantom", "make_heldout_case",
           "render_plan", "evaluate_points", "add_ct_noise", "ct_noise", "samples_for_spacing", "subsample_offsets"]


def plan_phantom(region: str, seed: int, lesions: int = 0,
                 lesions_within: Optional[tuple[np.ndarray, Sequence[int]]] = None) -> PhantomPlan:
    """Draw the continuous phantom of ``region`` for ``seed``.

    Args:
        lesions: how many lesions to put in the region's lesion organs (:data:`LESION_ORGANS`).
        lesions_within: optional (ijk_to_ras, shape_kji): keep lesion centres inside that grid.

    Raises:
        ValueError: unknown region, negative seed or count, or no room for a lesion.
    """
    if region not in RECIPES:
        raise ValueError(f"unknown region {region!r}; choose one of {', '.join(REGIONS)}")
    seed = operator.index(seed)
    lesions = operator.index(lesions)
    if seed < 0 or lesions < 0:
        raise ValueError(f"seed and lesions must be >= 0, got {seed} and {lesions}")
    phase = PHASES[int(np.random.default_rng([seed, 0]).integers(len(PHASES)))]
    anatomy = Builder(np.random.default_rng([seed, 1]), phase)
    RECIPES[region](anatomy)
    deformation = anatomy.deformation()
    focus = np.asarray(FOCUS_RAS[region]) + anatomy.rng.uniform(-8, 8, 3)
    records = []
    if lesions:
        lesion_builder = Builder(np.random.default_rng([seed, 2]), phase)
        lesion_builder.structures = anatomy.structures
        within = None if lesions_within is None else (np.asarray(lesions_within[0], np.float64),
                                                      tuple(int(s) for s in lesions_within[1]))
        records = add_lesions(lesion_builder, region, LESION_ORGANS[region], lesions, deformation, within)
    texture = draw_texture(np.random.default_rng([seed, 3]))
    return PhantomPlan(region, seed, anatomy.structures, deformation, texture, focus, phase, records)


def make_heldout_case(region: str, seed: int, ijk_to_ras, shape_kji: Sequence[int], lesions: int = 0,
                      samples_kji: Optional[Sequence[int]] = None) -> RenderedPhantom:
    """The phantom of ``region`` and ``seed`` on a grid, noise-free (add noise with :func:`add_ct_noise`).

    Lesion centres are kept inside the grid. See :func:`render_plan` for ``samples_kji``.
    """
    plan = plan_phantom(region, seed, lesions, (np.asarray(ijk_to_ras), shape_kji) if lesions else None)
    return render_plan(plan, ijk_to_ras, shape_kji, samples_kji)
