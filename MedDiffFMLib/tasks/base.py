"""The one calling shape shared by all six tasks.

Every task is ``run(request, models, progress=None, cancel=None) -> TaskResult``. The Slicer
module, the CLI, the benchmark and the tests call tasks only through :func:`run_task`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import numpy as np

from ..volume import Volume

TASKS = ("denoise", "anomaly", "synthesize", "superres", "lesion", "inpaint")


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


@dataclass
class TaskRequest:
    """What every task receives.

    Attributes:
        image: the input CT (HU, float32) on its grid; never modified. For ``synthesize`` it
            may be None when ``anatomy`` gives the grid.
        region: "head_neck", "chest", "abdomen", or None / "auto" to guess from the image.
        anatomy: optional integer label map (TotalSegmentator classes) on its own grid.
        anatomy_names: label value -> class name for ``anatomy`` (default TotalSegmentator v2).
        mask: optional boolean mask (lesion generation / inpainting) on its own grid; it is
            resampled to the image grid (nearest neighbour) when the grids differ.
        params: task parameters (see each task's ``PARAMS``); unknown keys are refused.
    """

    image: Optional[Volume] = None
    region: Optional[str] = None
    anatomy: Optional[Volume] = None
    anatomy_names: Optional[Mapping[int, str]] = None
    mask: Optional[Volume] = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class TaskResult:
    """What every task returns.

    Attributes:
        volumes: named output images (HU) on their grids, e.g. {"denoised": Volume}.
        segmentations: named boolean masks, e.g. {"anomaly": Volume}.
        scores: named numbers, e.g. {"noise_level_hu": 18.2, "anomaly_score": 0.31}.
        summary: one line for logs and the CLI.
    """

    volumes: dict[str, Volume] = field(default_factory=dict)
    segmentations: dict[str, Volume] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    summary: str = ""


def check_image(image: Volume | None, name: str = "image") -> Volume:
    """Refuse inputs a task cannot use, with a message a user understands."""
    if image is None:
        raise ValueError(f"this task needs an input {name}")
    arr = np.asarray(image.array)
    if arr.ndim != 3:
        raise ValueError(f"the {name} must be a 3-D volume (k, j, i); got {arr.ndim}-D with shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"the {name} is empty")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"the {name} must be numeric, got {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"the {name} contains NaN or infinite values; fix or mask them first")
    return image
