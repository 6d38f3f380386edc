"""Training settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainOptions:
    """Training settings. Batch size is per process; the effective batch is
    ``batch_size * world_size * grad_accum``."""

    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_accum: int = 1
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    precision: str = "auto"  # auto | fp32 | bf16
    p_drop_region: float = 0.15
    p_drop_anatomy: float = 0.15
    level_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    max_minutes: Optional[float] = None
    grad_clip: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch_size and grad_accum must be >= 1")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError("precision must be auto, fp32 or bf16")
        if abs(sum(self.level_probs) - 1) > 1e-6:
            raise ValueError("level_probs must sum to 1")
