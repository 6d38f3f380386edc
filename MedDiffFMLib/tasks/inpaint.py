"""Lesion inpainting: RePaint (Lugmayr et al. 2022) with the lesion ControlNet, no extra training.

At every reverse step the known region (outside the mask) is replaced by the input noised to
the same step, and the unknown region comes from the model; resampling jumps (re-noising
``jump_length`` steps and denoising again, ``jump_n_sample`` times) harmonise the two.
``content="lesion"`` asks the ControlNet for a lesion inside the mask; ``content="healthy"``
for healthy tissue (lesion removal). Outside the mask the output is the input, bit for bit.
"""

from __future__ import annotations

import torch

from ..diffusion import forward_jump, step
from ..finetune import lesion_condition
from ..sampling import Condition, ProgressTracker
from ..volume import Volume
from .base import COMMON_PARAMS, Cancelled, ParamSpec, TaskRequest, TaskResult
from .common import coord_range, region_index, sampler_for
from .lesion import paste, prepare_local

PARAMS = {
    **COMMON_PARAMS,
    "method": ParamSpec(str, "ddpm", "reverse step: ddpm (RePaint's) or ddim", ("ddim", "ddpm")),
    "jump_length": ParamSpec(int, 3, "RePaint: steps re-noised per jump"),
    "jump_n_sample": ParamSpec(int, 2, "RePaint: how often each jump is taken (1 = no resampling)"),
    "content": ParamSpec(str, "lesion", "what to paint inside the mask", ("lesion", "healthy")),
    "margin_mm": ParamSpec(float, 16.0, "context around the mask that the sampler sees (mm)"),
}


def repaint_schedule(steps: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's time-index sequence over ``steps`` levels (steps - 1 ... 0, then -1 = clean).

    Going down one level is a reverse step; going up is a forward re-noising jump.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError("jump_length and jump_n_sample must be >= 1")
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    t = steps
    seq = [t - 1]
    t -= 1
    while t >= 1:
        t -= 1
        seq.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                seq.append(t)
    seq.append(-1)
    return seq


def run(request: TaskRequest, params: dict, predictor, device, progress=None, cancel=None) -> TaskResult:
    image, region, grid, mask_in, mask_model, box, groups, unknown = prepare_local(request, params, predictor)
    y_full = torch.from_numpy(grid.unit)
    m_full = torch.from_numpy(mask_model)
    lesion_mask = m_full if params["content"] == "lesion" else torch.zeros_like(m_full)
    control = lesion_condition(y_full, lesion_mask)
    # the blanked channel must not leak the content being replaced, whatever is asked for
    control[1] = y_full * (~m_full).float()
    cond = Condition(region=region_index(region), anatomy=groups[box] if groups is not None else None,
                     control=control[(slice(None), *box)], coord_range=coord_range(box, grid.shape))
    sampler = sampler_for(predictor, params, device)
    sched = sampler.schedule
    levels = sched.timesteps(params["steps"])[::-1]  # ascending: levels[i] is the timestep of level i
    seq = repaint_schedule(len(levels), params["jump_length"], params["jump_n_sample"])
    ts_of = lambda i: levels[i] if i >= 0 else -1  # noqa: E731
    y = y_full[box]
    known = (~m_full[box]).float()
    gen = sampler.generator()
    x = sampler.noise_like(y.shape, gen)
    eta = sampler.options.step_eta
    n_down = sum(1 for a, b in zip(seq, seq[1:]) if b < a)
    tracker = ProgressTracker(progress, n_down, "inpainting")
    done = 0
    for cur, nxt in zip(seq, seq[1:]):
        t, t_next = ts_of(cur), ts_of(nxt)
        if nxt < cur:
            eps = sampler.predict_eps(x, t, cond, on_window=lambda d, n: tracker.window(done, d, n), cancel=cancel)
            x_unknown, _ = step(sched, x, eps, t, t_next, eta, gen, sampler.options.clip_x0)
            if t_next >= 0:
                a = sched.alpha_bar(t_next)
                x_known = a ** 0.5 * y + (1 - a) ** 0.5 * torch.randn(y.shape, generator=gen)
            else:
                x_known = y
            x = known * x_known + (1 - known) * x_unknown
            done += 1
        else:
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            x = forward_jump(sched, x, t, t_next, gen)
    out = paste(image, mask_in, mask_model, box, x.numpy(), grid, region)
    change = float(out[mask_in].mean() - image.array[mask_in].mean())
    return TaskResult(
        volumes={"inpainted": Volume(out, image.ijk_to_ras.copy())},
        segmentations={"inpainted_region": Volume(mask_in.copy(), image.ijk_to_ras.copy())},
        scores={"mean_change_hu": change, "network_steps": float(n_down)},
        summary=f"inpainted {int(mask_in.sum())} voxels with {params['content']} content "
                f"({n_down} reverse steps with resampling; mean change {change:+.1f} HU)",
        messages=[f"unknown anatomy classes: {', '.join(unknown)}"] if unknown else [],
    )
