"""What every task receives and returns, and the input checks they share.

The Slicer module, the CLI, the benchmark and the tests call tasks only through
:func:`MedDiffFMLib.tasks.run_task`; the task facts live in :mod:`.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from ..progress import CancelFlag, Cancelled, Progress, ProgressCallback, as_cancel_flag  # noqa: F401 (re-exported)
from ..volume import Volume
from .registry import COMMON_PARAMS, TASKS as TASK_SPECS, ParamSpec, check_params  # noqa: F401 (re-exported)

TASKS: tuple[str, ...] = tuple(TASK_SPECS)


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
        messages: notes for the user (e.g. anatomy classes the model does not know).
    """

    volumes: dict[str, Volume] = field(default_factory=dict)
    segmentations: dict[str, Volume] = field(default_factory=dict)
    scores: dict[str, float] = field(default_factory=dict)
    summary: str = ""
    messages: list[str] = field(default_factory=list)


def check_image(image: Volume | None, name: str = "image") -> Volume:
    """Refuse inputs a task cannot use, with a message a user understands."""
    if image is None:
        raise ValueError(f"this task needs an input {name}")
    arr = np.asarray(image.array)
    if arr.ndim != 3:
        raise ValueError(f"the {name} must be a 3-D volume (k, j, i); got {arr.ndim}-D with shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"the {name} is empty")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"the {name} must hold real numbers (HU), got {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"the {name} contains NaN or infinite values; fix or mask them first")
    return image
