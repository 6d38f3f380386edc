"""Progress reports and cancellation, shared by the sampler and the tasks."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional


class Cancelled(Exception):
    """Raised inside a task when its cancel flag is set; nothing is written."""


@dataclass
class Progress:
    """One progress report.

    Attributes:
        step: sampling steps done so far, out of ``total_steps``.
        window: windows evaluated in the current step, out of ``total_windows``.
        stage: short text ("sampling", "reconstruction 2/3", ...).
        fraction: overall fraction done in [0, 1].
        eta_s: estimated seconds left, or None until known.
    """

    step: int
    total_steps: int
    window: int = 0
    total_windows: int = 0
    stage: str = ""
    fraction: float = 0.0
    eta_s: Optional[float] = None


ProgressCallback = Callable[[Progress], None]
CancelFlag = Callable[[], bool]


def as_cancel_flag(cancel: "CancelFlag | threading.Event | None") -> CancelFlag:
    if cancel is None:
        return lambda: False
    if isinstance(cancel, threading.Event):
        return cancel.is_set
    return cancel
