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


def run(plan: LocalPlan, sampler, progress=None, cancel=None) -> TaskResult:
    import torch

    from ..conditions import lesion_condition
    from ..sampling import repaint

    p, image, mask = plan.params, plan.image, plan.mask
    y, m = plan.box_tensors(sampler.device)
    control = lesion_condition(y, m if p["content"] == "lesion" else torch.zeros_like(m))
    control[1] = y * (~m).float()  # the blanked channel never leaks the content being replaced
    x, n_down = repaint(sampler.denoiser(plan.condition(control), y.shape), sampler.schedule, y, ~m, p["steps"],
                        jump_length=p["jump_length"], jump_n_sample=p["jump_n_sample"], gen=sampler.generator(),
                        eta=sampler.options.step_eta, clip_x0=sampler.options.clip_x0, progress=progress,
                        cancel=cancel)
    out = plan.paste(x.cpu().numpy())
    change = float(out[mask].mean() - np.asarray(image.array)[mask].mean())
    return TaskResult(
        volumes={"inpainted": Volume(out, image.ijk_to_ras.copy())},
        segmentations={"inpainted_region": Volume(mask.copy(), image.ijk_to_ras.copy())},
        scores={"mean_change_hu": change, "network_steps": float(n_down)},
        summary=f"inpainted {int(mask.sum())} voxels with {p['content']} content "
                f"({n_down} reverse steps with resampling; mean change {change:+.1f} HU)",
        messages=plan.messages,
    )
