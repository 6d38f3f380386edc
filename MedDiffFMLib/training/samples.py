"""Multi-level training samples (image level, twice-the-window crop resized, native crop)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import anatomy
from ..networks import NULL_REGION
from ..sampling import axis_coordinates
from .cases import Case
from .options import TrainOptions


def _crop(t: Optional[torch.Tensor], starts, sizes) -> Optional[torch.Tensor]:
    if t is None:
        return None
    sl = tuple(slice(s, s + n) for s, n in zip(starts, sizes))
    return t[(..., *sl)]


def _resize(t: Optional[torch.Tensor], size, mode="trilinear") -> Optional[torch.Tensor]:
    """Resize the last three dims of a (C, D, H, W) float tensor."""
    if t is None or tuple(t.shape[-3:]) == tuple(size):
        return t
    return F.interpolate(t[None].float(), size=tuple(size), mode=mode, align_corners=True)[0]


def _pad_to(t: Optional[torch.Tensor], size) -> Optional[torch.Tensor]:
    if t is None:
        return None
    pads = [max(0, s - n) for s, n in zip(size, t.shape[-3:])]
    if not any(pads):
        return t
    return F.pad(t[None].float(), [0, pads[2], 0, pads[1], 0, pads[0]], mode="replicate")[0]


def draw_sample(case: Case, window: int, gen: torch.Generator, level: int) -> dict[str, torch.Tensor]:
    """One multi-level training sample from a case.

    Args:
        level: 0 image level, 1 twice-the-window crop resized, 2 native crop.

    Returns:
        dict with x0 (1, w, w, w), coords (3, w, w, w), anatomy (A, w, w, w) (zeros and flag 0
        when the case has no labels), spacing (3,) mm of one sample voxel, control (C, w, w, w)
        when the case has one.
    """
    shape = tuple(case.image.shape)
    w = (window,) * 3
    image = case.image[None]
    anat = anatomy.group_channels(case.groups[None])[0] if case.groups is not None else None
    if level == 0:
        starts, sizes = (0, 0, 0), shape
    else:
        want = 2 * window if level == 1 else window
        sizes = tuple(min(want, s) for s in shape)
        starts = tuple(int(torch.randint(0, s - n + 1, (1,), generator=gen)) for s, n in zip(shape, sizes))
        if case.focus is not None and len(case.focus) and float(torch.rand((), generator=gen)) < 0.5:
            # centre the crop (give or take a quarter window) on a random focus voxel
            f = case.focus[int(torch.randint(0, len(case.focus), (1,), generator=gen))]
            jitter = [int(torch.randint(-n // 4, n // 4 + 1, (1,), generator=gen)) for n in sizes]
            starts = tuple(int(min(max(int(c) - n // 2 + j, 0), s - n))
                           for c, n, s, j in zip(f, sizes, shape, jitter))
    control = case.control_fn(case.image, gen) if case.control_fn is not None else case.control
    parts = {"x0": _crop(image, starts, sizes), "anatomy": _crop(anat, starts, sizes),
             "control": _crop(control, starts, sizes)}
    # a resized sample's voxel covers (crop size / window) input voxels per axis
    spacing = [float(sp) * (1.0 if level == 2 else sz / ww) for sp, sz, ww in zip(case.spacing, sizes, w)]
    axes = []
    for n, s0, sz, ww in zip(shape, starts, sizes, w):
        full = axis_coordinates(n, n)
        if level == 2:
            axes.append(axis_coordinates(n, s0 + max(sz, ww))[s0: s0 + ww] if sz < ww else full[s0: s0 + ww])
        else:
            axes.append(torch.linspace(float(full[s0]), float(full[s0 + sz - 1]), ww))
    if level == 2:
        parts = {k: _pad_to(v, w) for k, v in parts.items()}
    else:
        parts = {k: _resize(v, w) for k, v in parts.items()}
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    if parts["anatomy"] is None:
        parts["anatomy"] = torch.zeros((anatomy.NUM_CHANNELS, *w))
    out = {"x0": parts["x0"].float(), "coords": coords, "anatomy": parts["anatomy"].float(),
           "region": torch.tensor(case.region, dtype=torch.long),
           "spacing": torch.tensor(spacing, dtype=torch.float32)}
    if parts["control"] is not None:
        out["control"] = parts["control"].float()
    return out


def draw_batch(cases: Sequence[Case], batch_size: int, window: int, gen: torch.Generator,
               options: TrainOptions) -> dict[str, torch.Tensor]:
    """A batch of multi-level samples with condition dropout."""
    probs = torch.tensor(options.level_probs, dtype=torch.float64)
    samples = []
    for _ in range(batch_size):
        case = cases[int(torch.randint(0, len(cases), (1,), generator=gen))]
        level = int(torch.multinomial(probs, 1, generator=gen))
        s = draw_sample(case, window, gen, level)
        if float(torch.rand((), generator=gen)) < options.p_drop_region:
            s["region"] = torch.tensor(NULL_REGION)
        if float(torch.rand((), generator=gen)) < options.p_drop_anatomy:
            s["anatomy"] = torch.zeros_like(s["anatomy"])
        samples.append(s)
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
