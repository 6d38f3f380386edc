"""What the benchmark reads about tasks, from the task registry (the one place it is written)."""

from __future__ import annotations

from typing import Optional


def _registry():
    try:
        from ..tasks.registry import TASKS
    except ImportError:  # the registry is not in this version of the library
        return None
    return TASKS


def _primary_name(task: str, kind: str) -> Optional[str]:
    registry = _registry()
    if registry is None:
        return None
    spec = registry[task]
    output = spec.primary_volume if kind == "volume" else spec.primary_segmentation
    return getattr(output, "name", output)


def primary_volume(task: str, result):
    """The task's primary output image (a Volume) in ``result``."""
    name = _primary_name(task, "volume") or next(iter(result.volumes))
    return result.volumes[name]


def primary_segmentation(task: str, result):
    """The task's primary output mask (a Volume) in ``result``."""
    name = _primary_name(task, "segmentation") or next(iter(result.segmentations))
    return result.segmentations[name]


def controlnet_task(task: str) -> Optional[str]:
    """The ControlNet a task needs ("superres", "lesion") or None."""
    registry = _registry()
    if registry is not None:
        return registry[task].controlnet
    from ..tasks import _MODULES

    return _MODULES[task][1]


def superres_factor_param(factor: int):
    """The ``factor`` parameter for thinner slices along k only, in the form the task takes."""
    from ..tasks import TASK_PARAMS

    spec = TASK_PARAMS["superres"]["factor"]
    return int(factor) if spec.type is int else [int(factor), 1, 1]
