"""Reverse chains over a :class:`PatchDenoiser`: short functions, one per way of sampling.

* :func:`sample_chain`: DDIM / DDPM steps along a list of timesteps, with an optional data
  step on the clean estimate (DiffPIR's proximal step);
* :func:`partial_diffusion`: noise a clean image to ``t_start``, then :func:`sample_chain`
  (SDEdit / AnoDDPM);
* :func:`diffpir`: plug-and-play restoration of y = x + n from the step matching the noise;
* :func:`repaint`: inpainting with resampling jumps (RePaint);
* :func:`coarse_to_fine`: a whole-volume pass at window size (wide context), refined on the
  full grid from an intermediate timestep.

All tensors are (D, H, W) on the denoiser's device, model units; timesteps are ints, -1 is
the clean image.
"""

from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import anatomy
from ..diffusion import NoiseSchedule, forward_jump, step, timestep_at
from ..progress import Cancelled, Progress
from .denoiser import Condition, PatchSampler

ProgressCallback = Callable[[Progress], None]
DataStep = Callable[[int, torch.Tensor], torch.Tensor]


class ProgressTracker:
    """Turns (step, window) events into :class:`Progress` reports with a time estimate."""

    def __init__(self, callback: Optional[ProgressCallback], total_steps: int, stage: str):
        self.callback = callback
        self.total_steps = total_steps
        self.stage = stage
        self.t0 = time.monotonic()

    def window(self, step_index: int, done: int, total: int) -> None:
        if self.callback is None:
            return
        fraction = (step_index + done / max(total, 1)) / max(self.total_steps, 1)
        elapsed = time.monotonic() - self.t0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        self.callback(Progress(step=step_index + (1 if done == total else 0), total_steps=self.total_steps,
                               window=done, total_windows=total, stage=self.stage, fraction=fraction, eta_s=eta))


def split_progress(callback: Optional[ProgressCallback], start: float, end: float) -> Optional[ProgressCallback]:
    """A callback that maps a sub-run's fraction into [start, end] of the parent's."""
    if callback is None:
        return None
    t0 = time.monotonic()

    def sub(p: Progress) -> None:
        frac = start + (end - start) * p.fraction
        done = frac - start
        # assume the rest of the parent runs at this sub-run's pace
        eta = (time.monotonic() - t0) * (1 - frac) / done if done > 0 else None
        callback(Progress(p.step, p.total_steps, p.window, p.total_windows, p.stage, frac, eta))

    return sub


@torch.inference_mode()
def sample_chain(denoiser, schedule: NoiseSchedule, x: torch.Tensor, ts: Sequence[int], *, eta: float = 0.0,
                 gen: Optional[torch.Generator] = None, clip_x0: bool = True, data_step: Optional[DataStep] = None,
                 progress: Optional[ProgressCallback] = None, cancel=None, stage: str = "sampling") -> torch.Tensor:
    """Reverse steps from ``x`` at ``ts[0]`` down ``ts`` to the clean image.

    ``data_step(t, x0)`` may replace each clean estimate (it then steers the chain)."""
    tracker = ProgressTracker(progress, len(ts), stage)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps = denoiser(x, t, on_window=lambda d, n, i=i: tracker.window(i, d, n), cancel=cancel)
        x0 = None
        if data_step is not None:
            x0 = data_step(t, _clean_estimate(schedule, x, eps, t, clip_x0))
        x, _ = step(schedule, x, eps, t, t_prev, eta, gen, clip_x0, x0=x0)
    return x


def _clean_estimate(schedule: NoiseSchedule, x: torch.Tensor, eps: torch.Tensor, t: int, clip: bool) -> torch.Tensor:
    a = schedule.alpha_bar(t)
    x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    return x0.clamp(-1, 1) if clip else x0


def noised(schedule: NoiseSchedule, x0: torch.Tensor, t: int, gen: torch.Generator) -> torch.Tensor:
    """A sample of q(x_t | x0): seeded noise drawn on the CPU, so every device gets the same."""
    noise = torch.randn(tuple(x0.shape), generator=gen).to(x0.device)
    a = schedule.alpha_bar(t)
    return a ** 0.5 * x0.float() + (1 - a) ** 0.5 * noise


def partial_diffusion(denoiser, schedule: NoiseSchedule, x0: torch.Tensor, t_start: int, steps: int, *,
                      gen: torch.Generator, eta: float = 0.0, clip_x0: bool = True, progress=None, cancel=None,
                      stage: str = "reconstruction") -> torch.Tensor:
    """Diffuse ``x0`` forward to ``t_start`` and reverse it in ``steps`` steps."""
    ts = schedule.timesteps(steps, t_start)
    return sample_chain(denoiser, schedule, noised(schedule, x0, ts[0], gen), ts, eta=eta, gen=gen,
                        clip_x0=clip_x0, progress=progress, cancel=cancel, stage=stage)


def diffpir(denoiser, schedule: NoiseSchedule, y: torch.Tensor, sigma: float, lam: float, steps: int, *,
            gen: torch.Generator, eta: float = 0.0, clip_x0: bool = True, progress=None, cancel=None) -> torch.Tensor:
    """DiffPIR (Zhu et al. 2023) for y = x + n, n ~ N(0, sigma^2) (model units).

    sqrt(a_t) y is a sample of the forward process at the t where sqrt((1 - a_t) / a_t) =
    sigma, so the chain starts there. Each clean estimate x0 is replaced by the minimiser of
    ||y - x||^2 / (2 sigma^2) + rho_t / 2 ||x - x0||^2, i.e. (y + rho_t x0) / (1 + rho_t) with
    rho_t = lam sigma^2 / sigma_t^2.
    """
    t_start = max(1, schedule.t_for_sigma(sigma))
    ts = schedule.timesteps(steps, t_start)
    x = schedule.alpha_bar(t_start) ** 0.5 * y

    def data_step(t: int, x0: torch.Tensor) -> torch.Tensor:
        rho = lam * sigma ** 2 / max(schedule.sigma(t) ** 2, 1e-12)
        return (y + rho * x0) / (1 + rho)

    return sample_chain(denoiser, schedule, x, ts, eta=eta, gen=gen, clip_x0=clip_x0, data_step=data_step,
                        progress=progress, cancel=cancel, stage="denoising")


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


@torch.inference_mode()
def repaint(denoiser, schedule: NoiseSchedule, y: torch.Tensor, known: torch.Tensor, steps: int, *,
            jump_length: int, jump_n_sample: int, gen: torch.Generator, eta: float = 1.0, clip_x0: bool = True,
            progress=None, cancel=None) -> tuple[torch.Tensor, int]:
    """RePaint (Lugmayr et al. 2022): at every reverse step the known region (``known`` = 1)
    is replaced by ``y`` noised to the same step; resampling jumps harmonise the two.

    Returns:
        (the sample, the number of network passes).
    """
    levels = schedule.timesteps(steps)[::-1]  # ascending: levels[i] is the timestep of level i
    seq = repaint_schedule(len(levels), jump_length, jump_n_sample)
    t_of = lambda i: levels[i] if i >= 0 else -1  # noqa: E731
    known = known.float()
    x = torch.randn(tuple(y.shape), generator=gen).to(y.device)
    n_down = sum(1 for a, b in zip(seq, seq[1:]) if b < a)
    tracker = ProgressTracker(progress, n_down, "inpainting")
    done = 0
    for cur, nxt in zip(seq, seq[1:]):
        t, t_next = t_of(cur), t_of(nxt)
        if nxt < cur:
            eps = denoiser(x, t, on_window=lambda d, n, k=done: tracker.window(k, d, n), cancel=cancel)
            x_unknown, _ = step(schedule, x, eps, t, t_next, eta, gen, clip_x0)
            x_known = noised(schedule, y, t_next, gen) if t_next >= 0 else y
            x = known * x_known + (1 - known) * x_unknown
            done += 1
        else:
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            x = forward_jump(schedule, x, t, t_next, gen)
    return x, n_down


def resize_condition(cond: Condition, shape: Sequence[int], size: Sequence[int]) -> Condition:
    """Conditions of a (D, H, W) grid resized to ``size``: anatomy as soft one-hot channels, the
    voxel size scaled with the grid (a coarse voxel covers shape / size fine ones)."""
    if tuple(shape) == tuple(size):
        return cond
    anat = None
    if cond.anatomy is not None:
        ch = anatomy.group_channels(cond.anatomy[None]) if cond.anatomy.ndim == 3 else cond.anatomy[None].float()
        anat = F.interpolate(ch.float(), size=tuple(size), mode="trilinear", align_corners=True)[0]
    control = None
    if cond.control is not None:
        control = F.interpolate(cond.control[None].float(), size=tuple(size), mode="trilinear",
                                align_corners=True)[0]
    spacing = tuple(float(s) * n / m for s, n, m in zip(cond.spacing, shape, size))
    return Condition(spacing, cond.region, anat, control, cond.coord_range)


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of a (D, H, W) tensor, corners aligned (as training resizes)."""
    if tuple(x.shape) == tuple(size):
        return x
    return F.interpolate(x[None, None].float(), size=tuple(size), mode="trilinear", align_corners=True)[0, 0]


def coarse_to_fine(sampler: PatchSampler, cond: Condition, shape: Sequence[int], *, refine_fraction: float,
                   x0: Optional[torch.Tensor] = None, coarse_t_start: Optional[int] = None, gen: torch.Generator,
                   progress=None, cancel=None, stage: str = "sampling") -> tuple[torch.Tensor, torch.Tensor]:
    """Wide context first, then the full grid.

    The whole volume is resized to one window (the image level of training: the voxel-size
    condition says how coarse), sampled there from pure noise or, given ``x0``, from ``x0``
    diffused to ``coarse_t_start``; the result is resized back and refined on the full grid
    from ``refine_fraction`` of T (0: no refinement) with that fraction of the steps. A volume
    that fits one window is sampled once, at full resolution.

    Returns:
        (the refined result, the coarse result resized to ``shape``).
    """
    opts = sampler.options
    sched = sampler.schedule
    eta = opts.step_eta
    T = sched.num_train_timesteps
    win = (sampler.window,) * 3
    fits = all(s <= w for s, w in zip(shape, win))
    size = tuple(shape) if fits else win
    coarse_cond = resize_condition(cond, shape, size)
    den = sampler.denoiser(coarse_cond, size)
    first, rest = (progress, None) if fits or refine_fraction <= 0 else (split_progress(progress, 0.0, 0.5),
                                                                      split_progress(progress, 0.5, 1.0))
    if x0 is None:
        ts = sched.timesteps(opts.steps, coarse_t_start)
        x = sample_chain(den, sched, sampler.noise(size, gen), ts, eta=eta, gen=gen, clip_x0=opts.clip_x0,
                         progress=first, cancel=cancel, stage=f"{stage} (whole volume)")
    else:
        t0 = T - 1 if coarse_t_start is None else coarse_t_start
        x = partial_diffusion(den, sched, resize(x0, size), t0, opts.steps, gen=gen, eta=eta, clip_x0=opts.clip_x0,
                              progress=first, cancel=cancel, stage=f"{stage} (whole volume)")
    coarse = resize(x, shape)
    if fits or refine_fraction <= 0:
        return coarse, coarse
    t_refine = timestep_at(refine_fraction, T)
    # the refinement keeps the step density of the whole chain: a fraction of T, that fraction of the steps
    fine_steps = max(1, int(round(opts.steps * refine_fraction)))
    fine = partial_diffusion(sampler.denoiser(cond, shape), sched, coarse, t_refine, fine_steps, gen=gen, eta=eta,
                             clip_x0=opts.clip_x0, progress=rest, cancel=cancel, stage=f"{stage} (refinement)")
    return fine, coarse
