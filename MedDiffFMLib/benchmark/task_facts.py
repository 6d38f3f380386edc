"""What the benchmark reads about tasks, from the task registry (the one place it is written)."""

from __future__ import annotations

from typing import Optional

from ..tasks.registry import TASKS


def primary_volume(task: str, result):
    """The task's primary output image (a Volume) in ``result``."""
    return result.volumes[TASKS[task].primary_volume]


def primary_segmentation(task: str, result):
    """The task's primary output mask (a Volume) in ``result``."""
    return result.segmentations[TASKS[task].primary_segmentation]


def controlnet_task(task: str) -> Optional[str]:
    """The ControlNet a task needs ("superres", "lesion") or None."""
    return TASKS[task].controlnet


def superres_factor_param(factor: int):
    """The ``factor`` parameter for ``factor`` thinner slices along k, in the form the task takes."""
    spec = TASKS["superres"].params["factor"]
    return int(factor) if spec.type is int else [int(factor), 1, 1]
