"""Test double for ``MedDiffFMLib.tasks.run_task``, loaded by the worker through its
``--task-runner fake_task_runner:run_task`` test hook (the folder is put on PYTHONPATH).

It has run_task's signature and reports progress like a real task, but computes nothing. The
behaviour is steered by parameters only this fake knows (prefixed ``fake_``). To exercise the
worker with the real code instead, drop the hook and give a tiny model directory as ``model``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np

from MedDiffFMLib.tasks.base import Cancelled, ParamSpec, Progress, TaskRequest, TaskResult, as_cancel_flag
from MedDiffFMLib.volume import Volume

_COMMON = {
    "steps": ParamSpec(int, 3, "steps"),
    "batch_size": ParamSpec(int, 4, "windows per call"),
    "fake_sleep": ParamSpec(float, 0.0, "seconds per step"),
    "fake_spawn_child": ParamSpec(bool, False, "start a grandchild process that sleeps"),
    "fake_oom_above_batch": ParamSpec(int, -1, "raise OutOfMemoryError while batch_size exceeds this"),
    "fake_fail": ParamSpec(str, "", "raise ValueError with this message"),
}
TASK_PARAMS = {t: dict(_COMMON) for t in ("denoise", "anomaly", "synthesize", "superres", "lesion", "inpaint")}


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the worker recognises by name."""


def run_task(task, request: TaskRequest, model=None, *, controlnet=None, device="auto", progress=None, cancel=None):
    unknown = sorted(set(request.params) - set(TASK_PARAMS[task]))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for task {task!r}")
    p = {k: request.params.get(k, spec.default) for k, spec in TASK_PARAMS[task].items()}
    is_cancelled = as_cancel_flag(cancel)
    print(f"worker pid {os.getpid()}", flush=True)
    print(f"fake run: task={task} model={model} controlnet={controlnet} device={device} "
          f"batch_size={p['batch_size']}", flush=True)
    if p["fake_fail"]:
        raise ValueError(p["fake_fail"])
    if p["fake_oom_above_batch"] >= 0 and p["batch_size"] > p["fake_oom_above_batch"]:
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if p["fake_spawn_child"]:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(f"child pid {child.pid}", flush=True)
    steps = int(p["steps"])
    for s in range(steps):
        for w in range(2):
            if is_cancelled():
                raise Cancelled()
            if progress is not None:
                frac = (s * 2 + w + 1) / (steps * 2)
                progress(Progress(step=s, total_steps=steps, window=w + 1, total_windows=2, stage="sampling",
                                  fraction=frac, eta_s=(1 - frac) * steps * p["fake_sleep"]))
            time.sleep(p["fake_sleep"] / 2)
    image = request.image
    out = Volume((np.asarray(image.array, np.float32) + 1.0), image.ijk_to_ras)
    mask = Volume(np.asarray(image.array) > 0, image.ijk_to_ras)
    return TaskResult(volumes={"denoised": out}, segmentations={"anomaly": mask},
                      scores={"anomaly_score": 0.5, "pid": float(os.getpid())}, summary=f"fake {task} done")
