"""Training cases for the task ControlNets (the conditions themselves live in ``conditions``).

* super-resolution: each sample draws a factor 2..6 and its condition is computed from the
  case's own thin slices (slab means along k, reconstructed by the piecewise-parabolic
  method), so one ControlNet learns
  every factor; cases come on grids with thin slices (<= 1.5 mm) so that the thick slices
  they simulate (f x the thin spacing) are the 1-9 mm of clinical series;
* lesion: the lesion mask and the image with the lesion region blanked. Cases without a
  lesion (empty mask) teach the ControlNet what "no lesion here" looks like, which lesion
  removal by inpainting uses.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from . import anatomy
from .conditions import SUPERRES_FACTORS, SUPERRES_INTERPOLATION_TRAINED, lesion_condition, superres_training_condition
from .networks import REGION_INDEX, ModelConfig
from .training import Case, draw_phantom, phantom_cases

# Super-resolution training targets have slices of at most this (mm): the thin grids the task
# makes. Its self-check runs the model one level thicker (factor x the input's slices), which
# a larger value brings inside the training range.
THIN_SLICE_MM = 1.5


def _draw_factor(factors: Sequence[int], interpolation: str):
    def control(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        f = int(factors[int(torch.randint(0, len(factors), (1,), generator=gen))])
        return superres_training_condition(image, f, interpolation)

    return control


def superres_cases(cases: Sequence[Case], factors: Sequence[int] = SUPERRES_FACTORS,
                   interpolation: str = SUPERRES_INTERPOLATION_TRAINED) -> list[Case]:
    """The cases with a super-resolution condition drawn per sample (factor in ``factors``; the thick
    slices brought back by ``interpolation``, which the ControlNet's config must record)."""
    bad = [f for f in factors if int(f) not in SUPERRES_FACTORS]
    if bad or not factors:
        raise ValueError(f"super-resolution factors must be among {SUPERRES_FACTORS}, got {list(factors)}")
    fn = _draw_factor(tuple(int(f) for f in factors), interpolation)
    return [Case(c.image, c.spacing, c.groups, c.region, control_fn=fn, name=c.name) for c in cases]


def superres_phantom_cases(n: int, cfg: ModelConfig, seed: int = 0, factors: Sequence[int] = SUPERRES_FACTORS,
                           **kwargs) -> list[Case]:
    """Thin-slice phantoms (<= :data:`THIN_SLICE_MM` along k) with per-sample super-resolution conditions."""
    return superres_cases(phantom_cases(n, cfg, seed, thin_slice_mm=THIN_SLICE_MM, **kwargs), factors)


def lesion_phantom_cases(n: int, cfg: ModelConfig, seed: int = 0, lesions: int = 3,
                         regions: Sequence[str] = ("head_neck", "chest", "abdomen"),
                         fov_mm: Sequence[float] = (192.0, 256.0, 256.0), p_healthy: float = 0.2,
                         max_voxels: int = 1_000_000, family: str = "adult") -> list[Case]:
    """Phantoms with inserted lesions and their lesion conditions (seeds ``seed .. seed + n - 1``,
    each drawn by :func:`~MedDiffFMLib.training.draw_phantom`); a share ``p_healthy`` has none."""
    from .preprocessing import hu_to_unit

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        region = regions[i % len(regions)]
        healthy = rng.random() < p_healthy
        ph = draw_phantom(seed + i, region, cfg, family, fov_mm, max_voxels, lesions=0 if healthy else lesions)
        img = torch.from_numpy(hu_to_unit(ph.hu, region).astype(np.float32))
        mask = torch.from_numpy(ph.lesion_mask)
        g, _ = anatomy.group_map(ph.labels, ph.label_names)
        focus = torch.nonzero(mask) if mask.any() else None
        out.append(Case(img, ph.spacing_kji, torch.from_numpy(g), REGION_INDEX[region], lesion_condition(img, mask),
                        focus=focus, name=f"lesion-phantom-{family}-{region}-{seed + i}"))
    return out


def lesion_cases_from_arrays(hu: np.ndarray, ijk_to_ras: np.ndarray, mask: np.ndarray, region: Optional[str],
                             cfg: ModelConfig, labels=None, label_names=None, name: str = "") -> Case:
    """A real image + lesion mask pair on its own grid (for ``meddiff-fm finetune --task lesion``)."""
    from .training import case_from_arrays

    case = case_from_arrays(hu, ijk_to_ras, region, cfg, labels, label_names, name)
    mt = torch.from_numpy(np.asarray(mask, dtype=bool))
    if tuple(mt.shape) != tuple(case.image.shape):
        raise ValueError(f"lesion mask {tuple(mt.shape)} and image {tuple(case.image.shape)} differ in shape")
    case.control = lesion_condition(case.image, mt)
    case.focus = torch.nonzero(mt) if mt.any() else None
    return case
