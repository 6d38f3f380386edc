"""Lesion inpainting: RePaint (Lugmayr et al. 2022) with the lesion ControlNet, no extra training.

``content="lesion"`` asks the ControlNet for a lesion inside the mask; ``content="healthy"``
for healthy tissue (lesion removal). Sampling runs on a box around the mask on the input's
own grid; outside the mask the output is the input, bit for bit.
"""

from __future__ import annotations

import numpy as np

from ..volume import Volume
from .base import TaskResult
from .lesion import LocalPlan, prepare_local

prepare = prepare_local


def surrounding_median(unit: np.ndarray, mask: np.ndarray, spacing_kji) -> float:
    """Median of ``unit`` over a shell around ``mask`` as thick as the mask's equivalent
    radius (at least two of the coarsest voxels), in the same units."""
    from scipy import ndimage

    spacing = np.asarray(spacing_kji, dtype=np.float64)
    radius = max((3.0 * mask.sum() * spacing.prod() / (4.0 * np.pi)) ** (1.0 / 3.0), 2.0 * spacing.max())
    shell = (ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius) & ~mask
    values = unit[shell] if shell.any() else unit[~mask]
    return float(np.median(values)) if values.size else 0.0


def run(plan: LocalPlan, sampler, progress=None, cancel=None) -> TaskResult:
    import torch

    from ..conditions import lesion_condition
    from ..sampling import repaint

    p, image, mask = plan.params, plan.image, plan.mask
    y, m = plan.box_tensors(sampler.device)
    if p["content"] == "lesion":
        control = lesion_condition(y, m)
    else:
        # The ControlNet saw "no lesion" only with an intact image: a blanked region would be
        # copied as tissue of the blank's value (the window centre; measured in held-out lungs:
        # 390-450 HU off). The region shows the median of the tissue around it instead (never
        # the content being replaced), and RePaint adds the texture.
        control = lesion_condition(y, torch.zeros_like(m))
        fill = surrounding_median(plan.unit_box, plan.mask[plan.box], plan.image.spacing_kji)
        control[1] = torch.where(m, torch.full_like(y, fill), y)
    x, n_down = repaint(sampler.denoiser(plan.condition(control), y.shape), sampler.schedule, y, ~m, p["steps"],
                        jump_length=p["jump_length"], jump_n_sample=p["jump_n_sample"], gen=sampler.generator(),
                        eta=sampler.options.step_eta, clip_x0=sampler.options.clip_x0, progress=progress,
                        cancel=cancel)
    out = plan.paste(x.cpu().numpy(), sampler)
    change = float(out[mask].mean() - np.asarray(image.array)[mask].mean())
    return TaskResult(
        volumes={"inpainted": Volume(out, image.ijk_to_ras.copy())},
        segmentations={"inpainted_region": Volume(mask.copy(), image.ijk_to_ras.copy())},
        scores={"mean_change_hu": change, "network_steps": float(n_down)},
        summary=f"inpainted {int(mask.sum())} voxels with {p['content']} content "
                f"({n_down} reverse steps with resampling; mean change {change:+.1f} HU)",
        messages=plan.messages,
    )
