"""Training pairs for the task ControlNets.

* super-resolution: thick-slice volumes simulated from thin-slice ones (slice averaging and
  subsampling, along k and optionally in-plane), resampled back onto the thin grid as the
  condition (1 channel);
* lesion: the lesion mask and the image with the lesion region blanked (2 channels), as
  DiffTumor conditions its generator. Cases without a lesion (empty mask) teach the
  ControlNet what "no lesion here" looks like, which lesion removal by inpainting uses.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import anatomy
from .networks import REGION_INDEX, ModelConfig
from .training import Case

BLANK_VALUE = 0.0  # model units written into the lesion region of the lesion condition


def thick_slices(x: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """Simulate a low-resolution acquisition: average ``factor`` neighbouring voxels per axis
    (k, j, i) and keep one value per block. Trailing voxels that do not fill a block are dropped.

    Args:
        x: (D, H, W) image.
        factor: integer factors per axis (k, j, i).

    Returns:
        (D // fk, H // fj, W // fi) tensor.
    """
    f = tuple(int(a) for a in factor)
    if any(a < 1 for a in f):
        raise ValueError(f"factors must be positive integers, got {factor}")
    d, h, w = (s // a * a for s, a in zip(x.shape, f))
    if min(d, h, w) == 0:
        raise ValueError(f"volume {tuple(x.shape)} is smaller than one block of {f}")
    return F.avg_pool3d(x[None, None, :d, :h, :w].float(), kernel_size=f, stride=f)[0, 0]


def upsample_blocks(low: torch.Tensor, factor: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Linear interpolation of a block-averaged volume back onto the fine grid of ``shape``.

    Block n covers fine voxels [n f, (n + 1) f): its centre is at fine index n f + (f - 1) / 2,
    which is what ``align_corners=False`` assumes. Fine voxels past the last block take the edge.
    """
    f = tuple(int(a) for a in factor)
    full = tuple(s * a for s, a in zip(low.shape, f))
    up = F.interpolate(low[None, None].float(), size=full, mode="trilinear", align_corners=False)[0, 0]
    pads = [max(0, t - u) for t, u in zip(shape, full)]
    if any(pads):
        up = F.pad(up[None, None], [0, pads[2], 0, pads[1], 0, pads[0]], mode="replicate")[0, 0]
    return up[: shape[0], : shape[1], : shape[2]]


def superres_condition(image: torch.Tensor, factor: Sequence[int]) -> torch.Tensor:
    """(1, D, H, W) condition: the simulated thick-slice image, back on the thin grid."""
    return upsample_blocks(thick_slices(image, factor), factor, image.shape)[None]


def lesion_condition(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(2, D, H, W) condition: lesion mask, and the image with the mask blanked."""
    m = mask.float()
    return torch.stack([m, image * (1 - m) + BLANK_VALUE * m])


def superres_cases(cases: Sequence[Case], factor: Sequence[int]) -> list[Case]:
    return [Case(c.image, c.groups, c.region, superres_condition(c.image, factor), name=c.name) for c in cases]


def lesion_phantom_cases(n: int, cfg: ModelConfig, seed: int = 0, lesions: int = 3,
                         regions: Sequence[str] = ("head_neck", "chest", "abdomen"),
                         fov_mm: Sequence[float] = (192.0, 256.0, 256.0), p_healthy: float = 0.2) -> list[Case]:
    """Phantoms with inserted lesions and their lesion conditions (seeds ``seed .. seed + n - 1``)."""
    from .phantoms import make_phantom
    from .preprocessing import hu_to_unit

    shape = tuple(max(1, int(round(f / cfg.spacing_mm))) for f in fov_mm)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        region = regions[i % len(regions)]
        healthy = rng.random() < p_healthy
        ph = make_phantom(region, shape_kji=shape, spacing_kji=(cfg.spacing_mm,) * 3, seed=seed + i,
                          lesions=0 if healthy else lesions, noise_hu=0.0)
        img = torch.from_numpy(hu_to_unit(ph.hu, region).astype(np.float32))
        mask = torch.from_numpy(ph.lesion_mask)
        g, _ = anatomy.group_map(ph.labels, ph.label_names)
        focus = torch.nonzero(mask) if mask.any() else None
        out.append(Case(img, torch.from_numpy(g), REGION_INDEX[region], lesion_condition(img, mask), focus=focus,
                        name=f"lesion-phantom-{region}-{seed + i}"))
    return out


def lesion_cases_from_arrays(hu: np.ndarray, ijk_to_ras: np.ndarray, mask: np.ndarray, region: Optional[str],
                             cfg: ModelConfig, labels=None, label_names=None, name: str = "") -> Case:
    """A real image + lesion mask pair on the model grid (for ``meddiff-fm finetune --task lesion``)."""
    from . import preprocessing
    from .training import case_from_arrays

    case = case_from_arrays(hu, ijk_to_ras, region, cfg, labels, label_names, name)
    m, _ = preprocessing.resample(mask.astype(bool), ijk_to_ras, (cfg.spacing_mm,) * 3, order=0)
    mt = torch.from_numpy(np.asarray(m, dtype=bool))
    case.control = lesion_condition(case.image, mt)
    case.focus = torch.nonzero(mt) if mt.any() else None
    return case
