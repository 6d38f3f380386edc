"""The one calling shape shared by all six tasks.

Every task is ``run(request, models, progress=None, cancel=None) -> TaskResult``. The Slicer
module, the CLI, the benchmark and the tests call tasks only through :func:`run_task`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from ..progress import CancelFlag, Cancelled, Progress, ProgressCallback, as_cancel_flag  # noqa: F401 (re-exported)
from ..volume import Volume

TASKS = ("denoise", "anomaly", "synthesize", "superres", "lesion", "inpaint")


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


@dataclass(frozen=True)
class ParamSpec:
    """One task parameter: its type, default and a help line (used by the CLI and the UI)."""

    type: type
    default: Any
    help: str
    choices: Optional[tuple] = None


# Parameters every sampling task takes.
COMMON_PARAMS: dict[str, ParamSpec] = {
    "steps": ParamSpec(int, 20, "number of reverse diffusion steps actually run"),
    "seed": ParamSpec(int, 0, "random seed; the same seed gives the same result on the same device"),
    "method": ParamSpec(str, "ddim", "reverse step: ddim (deterministic) or ddpm (ancestral)", ("ddim", "ddpm")),
    "window": ParamSpec(int, 0, "window edge in voxels (0 = the model's own)"),
    "overlap": ParamSpec(float, 0.25, "overlap between neighbouring windows, in [0, 1)"),
    "batch_size": ParamSpec(int, 4, "windows per network call (memory bound)"),
    "precision": ParamSpec(str, "auto", "auto (bf16 on GPUs that have it), fp32, bf16 or fp16",
                           ("auto", "fp32", "bf16", "fp16")),
    "backend": ParamSpec(str, "torch", "network runtime: torch, or onnx (onnxruntime; its CUDA provider with "
                                       "onnxruntime-gpu)", ("torch", "onnx")),
}


def check_params(task: str, params: Mapping[str, Any], specs: Mapping[str, ParamSpec]) -> dict[str, Any]:
    """Defaults filled in, types coerced, unknown keys refused."""
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for task {task!r}; known: {sorted(specs)}")
    out = {}
    for name, spec in specs.items():
        value = params.get(name, spec.default)
        if spec.type is bool and isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"parameter {name!r} of task {task!r} must be true or false, got {value!r}")
            value = value.lower() in ("1", "true", "yes", "on")
        elif value is not None and spec.type is not object:
            try:
                value = spec.type(value)
            except (TypeError, ValueError) as e:
                raise ValueError(f"parameter {name!r} of task {task!r} must be {spec.type.__name__}: {e}") from e
        if spec.choices is not None and value not in spec.choices:
            raise ValueError(f"parameter {name!r} must be one of {spec.choices}, got {value!r}")
        out[name] = value
    return out


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
