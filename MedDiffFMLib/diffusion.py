"""Noise schedule and single steps of the reverse process.

The schedule (betas, cumulative alphas) comes from MONAI's schedulers. The steps are written
here because the tasks need transitions between *arbitrary* timesteps: MONAI's DDIM step
assumes a uniform grid that starts at T - 1, whereas denoising and anomaly detection start at
an intermediate t and RePaint jumps back up the chain. DDPM sampling is the eta = 1 case of
the same step (the ancestral posterior of DDIM, Song et al. 2021, eq. 16).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from monai.networks.schedulers import DDPMScheduler

from .networks import ModelConfig


def timestep_at(fraction: float, num_train_timesteps: int) -> int:
    """The timestep ``fraction`` of the way from 0 (clean) to T - 1 (pure noise), rounded."""
    return int(round(fraction * (num_train_timesteps - 1)))


class NoiseSchedule:
    """Cumulative alphas of the training process, on the CPU in float64 for exact lookups."""

    def __init__(self, cfg: ModelConfig):
        self.num_train_timesteps = cfg.num_train_timesteps
        scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, schedule=cfg.schedule,
                                  clip_sample=False)
        self.alphas_cumprod = scheduler.alphas_cumprod.double()

    def alpha_bar(self, t: int) -> float:
        """Cumulative alpha at timestep t; t = -1 means the clean image (1.0)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def sigma(self, t: int) -> float:
        """Noise-to-signal ratio sqrt((1 - a) / a) at t: the noise std of x_t / sqrt(a) in image units."""
        a = self.alpha_bar(t)
        return float(np.sqrt((1.0 - a) / a))

    def t_for_sigma(self, sigma: float) -> int:
        """The timestep whose noise-to-signal ratio is closest to ``sigma`` (image units)."""
        a = self.alphas_cumprod.numpy()
        sig = np.sqrt((1.0 - a) / a)
        return int(np.argmin(np.abs(sig - sigma)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, with t of shape (B,) for x0 of shape (B, ...)."""
        a = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def timesteps(self, steps: int, t_start: Optional[int] = None) -> list[int]:
        """``steps`` descending, evenly spaced timesteps from ``t_start`` (default T - 1) to 0."""
        t_start = self.num_train_timesteps - 1 if t_start is None else int(t_start)
        if not 0 <= t_start < self.num_train_timesteps:
            raise ValueError(f"t_start must be in [0, {self.num_train_timesteps - 1}], got {t_start}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        steps = min(int(steps), t_start + 1)
        ts = np.round(np.linspace(t_start, 0, steps)).astype(int)
        return [int(t) for t in ts]


def predict_x0(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    a = schedule.alpha_bar(t)
    return (x_t - (1 - a) ** 0.5 * eps) / a ** 0.5


def step(
    schedule: NoiseSchedule,
    x_t: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    eta: float = 0.0,
    generator: Optional[torch.Generator] = None,
    clip_x0: bool = True,
    x0: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step from t to t_prev < t (t_prev = -1 returns the clean estimate).

    Args:
        x_t: the current sample (any shape), model units.
        eps: the predicted noise, same shape.
        eta: 0 for deterministic DDIM, 1 for DDPM's ancestral sampling.
        clip_x0: clip the clean estimate to [-1, 1], the range of windowed CT.
        x0: an already corrected clean estimate (DiffPIR's data step); eps is then recomputed
            from it so the step stays on the same trajectory.

    Returns:
        (x_{t_prev}, x0 estimate).
    """
    a_t = schedule.alpha_bar(t)
    a_prev = schedule.alpha_bar(t_prev)
    if x0 is None:
        x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
    else:
        eps = (x_t - a_t ** 0.5 * x0) / (1 - a_t) ** 0.5
    if t_prev < 0:
        return x0, x0
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * max(var, 0.0) ** 0.5
    direction = max(1 - a_prev - std ** 2, 0.0) ** 0.5 * eps
    x_prev = a_prev ** 0.5 * x0 + direction
    if std > 0:
        # drawn on the CPU generator, so that a seed gives the same chain on every device
        noise = torch.randn(tuple(x_t.shape), generator=generator).to(device=x_t.device, dtype=x_t.dtype)
        x_prev = x_prev + std * noise
    return x_prev, x0


def forward_jump(schedule: NoiseSchedule, x_t: torch.Tensor, t: int, t_next: int,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample q(x_{t_next} | x_t) for t_next > t: re-noise along the forward chain (RePaint)."""
    ratio = schedule.alpha_bar(t_next) / schedule.alpha_bar(t)
    noise = torch.randn(tuple(x_t.shape), generator=generator).to(device=x_t.device, dtype=x_t.dtype)
    return ratio ** 0.5 * x_t + (1 - ratio) ** 0.5 * noise
