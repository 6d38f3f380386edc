"""The six user tasks behind one entry point, :func:`run_task`.

Every task follows one skeleton, in its own module:

* ``prepare(request, params, models) -> plan``: every check (inputs, masks, grids, memory),
  the region and the conditions, in numpy, before any weights are loaded or any sampling;
* ``run(plan, sampler, progress, cancel) -> TaskResult``: the chain (see ``sampling``) and
  the finish: back to the output grid, scores.

Tasks run on the input's own grid (the model is conditioned on voxel size), so what a task
does not mean to change comes back bit for bit. The task facts (parameters, bounds,
outputs) are in :mod:`.registry`.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Optional

# torch is imported where it is needed, so that the Slicer module and the worker can read
# task facts (and start) without paying for torch and MONAI.
from .base import Cancelled, Progress, TaskRequest, TaskResult, as_cancel_flag
from .registry import TASKS as TASK_SPECS
from .registry import ParamSpec, check_params, task_spec

__all__ = ["TASKS", "TASK_SPECS", "TASK_PARAMS", "run_task", "TaskRequest", "TaskResult", "Progress", "Cancelled",
           "ParamSpec", "OutOfMemory"]

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = tuple(TASK_SPECS)
TASK_PARAMS: dict[str, dict[str, ParamSpec]] = {name: dict(spec.params) for name, spec in TASK_SPECS.items()}


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory even with one window per batch."""


def run_task(task: str, request: TaskRequest, model: Optional[str | os.PathLike] = None, *,
             controlnet: Optional[str | os.PathLike] = None, device: str = "auto",
             progress=None, cancel=None) -> TaskResult:
    """Run one of :data:`TASKS` on ``request``.

    Args:
        task: "denoise", "anomaly", "synthesize", "superres", "lesion" or "inpaint".
        request: inputs and ``params`` (see ``TASK_SPECS[task].params``).
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
        ValueError: bad input, with a one-line message for the user, before any sampling.
    """
    import torch

    from .common import Models, load_predictor, resolve_device, sampler_for

    from ..preflight import check_request

    spec = task_spec(task)
    check_request(task, request)  # types and values before the inputs are locked or any work
    params = check_params(task, request.params)
    mod = importlib.import_module(f".{spec.module}", __name__)
    dev = resolve_device(device, params["backend"])
    models = Models.resolve(spec, model, controlnet)
    plan = mod.prepare(request, params, models)
    predictor = load_predictor(models, dev, params["backend"], device)
    cancel_flag = as_cancel_flag(cancel)
    guard = _InputGuard(request)
    batch = params["batch_size"]
    try:
        while True:
            try:
                return mod.run(plan, sampler_for(predictor, {**params, "batch_size": batch}, dev), progress,
                               cancel_flag)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if batch <= 1:
                    raise OutOfMemory("the GPU ran out of memory even with one window at a time; "
                                      "use a smaller window or run on the CPU (device 'cpu')") from None
                batch = max(1, batch // 2)
                log.warning("GPU out of memory: retrying with batch_size=%d", batch)
    finally:
        guard.release()


class _InputGuard:
    """Makes the caller's input arrays read-only for the whole task, every retry included,
    so that a task can never write into them; restores them afterwards."""

    def __init__(self, request: TaskRequest):
        self.arrays = []
        for v in (request.image, request.anatomy, request.mask):
            arr = getattr(v, "array", None)
            if arr is not None and hasattr(arr, "flags") and arr.flags.writeable:
                arr.flags.writeable = False
                self.arrays.append(arr)

    def release(self) -> None:
        for arr in self.arrays:
            arr.flags.writeable = True
        self.arrays = []
