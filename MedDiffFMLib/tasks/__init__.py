"""The six user tasks behind one entry point, :func:`run_task`.

Each task module has ``PARAMS`` (name -> ParamSpec) and ``run(request, params, predictor,
device, progress, cancel) -> TaskResult``. ``run_task`` validates, loads (and caches) the
model, keeps the input untouched, retries on GPU out-of-memory with smaller batches, and turns
a cancel into :class:`Cancelled` with nothing returned.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

import numpy as np

# torch is imported where it is needed, so that the Slicer module and the worker can read
# task parameters (and start) without paying for torch and MONAI.
from .base import (TASKS, Cancelled, ParamSpec, Progress, TaskRequest, TaskResult, as_cancel_flag,
                   check_params)

__all__ = ["TASKS", "TASK_PARAMS", "run_task", "TaskRequest", "TaskResult", "Progress", "Cancelled", "ParamSpec"]

log = logging.getLogger(__name__)

# task -> (module, ControlNet task it needs or None)
_MODULES = {
    "denoise": ("denoise", None),
    "anomaly": ("anomaly", None),
    "synthesize": ("synthesize", None),
    "superres": ("superres", "superres"),
    "lesion": ("lesion", "lesion"),
    "inpaint": ("inpaint", "lesion"),
}


def _module(task: str):
    if task not in _MODULES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(f".{_MODULES[task][0]}", __name__)


class _Params(dict):
    """Lazy ``task -> PARAMS`` so importing the package stays light."""

    def __missing__(self, task):
        self[task] = _module(task).PARAMS
        return self[task]

    def __iter__(self):
        return iter(TASKS)

    def keys(self):
        return list(TASKS)

    def items(self):
        return [(t, self[t]) for t in TASKS]


TASK_PARAMS: dict[str, dict[str, ParamSpec]] = _Params()


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory even with one window per batch."""


def run_task(task: str, request: TaskRequest, model: Optional[str | os.PathLike] = None, *,
             controlnet: Optional[str | os.PathLike] = None, device: str = "auto",
             progress=None, cancel=None) -> TaskResult:
    """Run one of :data:`TASKS` on ``request``.

    Args:
        task: "denoise", "anomaly", "synthesize", "superres", "lesion" or "inpaint".
        request: inputs and ``params`` (see ``TASK_PARAMS[task]``).
        model: foundation model directory or registry id (None: the default demo weights).
        controlnet: ControlNet directory or registry id for superres / lesion / inpaint
            (None: the default for that task).
        device: "auto", "cpu", "cuda" or "cuda:N".
        progress: called with :class:`Progress` reports.
        cancel: a callable returning True, or a ``threading.Event``, to stop early.

    Returns:
        The :class:`TaskResult`. The input arrays are never modified.

    Raises:
        Cancelled: when cancelled; nothing is returned or written.
        ValueError: bad input, with a message for the user.
    """
    import torch

    from .common import load_predictor, resolve_device, resolve_model_dir

    from ..preflight import check_request

    mod = _module(task)
    check_request(task, request)  # types and values before the inputs are locked or any work
    params = check_params(task, request.params, mod.PARAMS)
    dev = resolve_device(device)
    model_dir = resolve_model_dir(model, kind="base")
    cn_task = _MODULES[task][1]
    cn_dir = resolve_model_dir(controlnet, kind="controlnet", task=cn_task) if cn_task else None
    predictor = load_predictor(model_dir, cn_dir, dev)
    if cn_task is not None and predictor.controlnet.cfg.task != cn_task:
        raise ValueError(f"the ControlNet in {cn_dir} was trained for {predictor.controlnet.cfg.task!r}; "
                         f"task {task!r} needs a {cn_task!r} ControlNet")
    cancel_flag = as_cancel_flag(cancel)
    guard = _InputGuard(request)
    batch = int(params.get("batch_size", 4))
    try:  # the inputs stay locked through every out-of-memory retry
        while True:
            try:
                result = mod.run(request, {**params, "batch_size": batch}, predictor, dev, progress, cancel_flag)
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch <= 1:
                    raise OutOfMemory("the GPU ran out of memory even with one window at a time; "
                                      "use a smaller window or run on the CPU (device 'cpu')") from None
                batch = max(1, batch // 2)
                log.warning("GPU out of memory: retrying with batch_size=%d", batch)
    finally:
        guard.check()
    return result


class _InputGuard:
    """Fails loudly if a task ever writes into its inputs (they belong to the caller)."""

    def __init__(self, request: TaskRequest):
        self.items = []
        for v in (request.image, request.anatomy, request.mask):
            if v is not None:
                arr = np.asarray(v.array)
                if arr.flags.writeable and isinstance(v.array, np.ndarray):
                    v.array.flags.writeable = False
                    self.items.append(v)

    def check(self) -> None:
        for v in self.items:
            v.array.flags.writeable = True
        self.items = []
