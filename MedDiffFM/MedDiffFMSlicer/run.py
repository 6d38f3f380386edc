"""Running a task from the module: in the worker process, polled from the GUI, with the console
command logged, a GPU-memory check first, and the result files read off the main thread.

The steps are those of :func:`.nodes.process` (prepare the request, run it, add the results),
driven so that a GUI timer can poll: :func:`start` prepares and launches, :meth:`Job.poll`
streams progress and, once the worker has exited, reads its result files on a background
thread (plain numpy; MRML must stay on the main thread), and :meth:`Job.finish` adds the nodes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from MedDiffFMLib.tasks.base import Progress, TaskResult
from MedDiffFMLib.worker import WorkerClient

from . import nodes, outputs


@dataclass(frozen=True)
class WorkerSettings:
    """How to start the worker: the interpreter (Slicer: ``PythonSlicer``), the folders put on
    its PYTHONPATH, extra environment variables and where request folders go. Made on the main
    thread (it may read Qt settings) and passed as plain values to any thread."""

    python: str
    pythonpath: tuple[str, ...]
    env: Mapping[str, str]
    work_root: Optional[str] = None
    task_runner: Optional[str] = None  # test hook of the worker

    def client_options(self) -> dict[str, Any]:
        return {"python": self.python, "pythonpath": list(self.pythonpath), "env": dict(self.env),
                "work_root": self.work_root, "task_runner": self.task_runner}


class Job:
    """One task running in the worker, with what is needed to turn its result into nodes."""

    def __init__(self, client: WorkerClient, input_volume_node, task: str, params: Mapping[str, Any],
                 output_volume=None, output_segmentation=None, command: str = ""):
        self.client = client
        self.input_volume_node = input_volume_node
        self.task = task
        self.params = dict(params)
        self.output_volume = output_volume
        self.output_segmentation = output_segmentation
        self.command = command
        self.started = time.monotonic()
        self.summary = ""
        self._loader: Optional[threading.Thread] = None
        self._result: Optional[TaskResult] = None
        self._error: Optional[BaseException] = None
        self.loader_thread_id: Optional[int] = None

    def poll(self) -> bool:
        """Call from the GUI timer: True while the task runs or its result is being read."""
        if self.client.poll():
            return True
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="meddifffm-result-reader", daemon=True)
            self._loader.start()
        return self._loader.is_alive()

    def _load(self) -> None:
        self.loader_thread_id = threading.get_ident()
        try:
            self._result = self.client.collect()
        except BaseException as e:  # noqa: B036 - handed to finish() on the main thread
            self._error = e

    def cancel(self) -> None:
        self.client.cancel()

    def finish(self) -> dict[str, Any]:
        """On the main thread, after :meth:`poll` returned False: the outputs as nodes. Raises
        the worker's error (Cancelled, WorkerOutOfMemory, WorkerError); nothing is added then."""
        if self._loader is None or self._loader.is_alive():
            raise RuntimeError("the job has not finished: poll() until it returns False")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        self.summary = self._result.summary
        return outputs.result_to_nodes(self._result, self.input_volume_node, self.task, params=self.params,
                                       output_volume=self.output_volume,
                                       output_segmentation=self.output_segmentation)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started


def start(settings: WorkerSettings, input_volume_node, task: str, *, params: Optional[Mapping[str, Any]] = None,
          region: Optional[str] = None, anatomy_segmentation=None, mask_segmentation=None,
          mask_segment_id: Optional[str] = None, model=None, controlnet=None, device: str = "auto",
          output_volume=None, output_segmentation=None, on_progress: Optional[Callable[[Progress], None]] = None,
          on_log: Optional[Callable[[str], None]] = None) -> Job:
    """Check the inputs, read the nodes and launch the worker; returns at once (poll the job)."""
    request = nodes.prepare_request(input_volume_node, task, params=params, region=region,
                                    anatomy_segmentation=anatomy_segmentation, mask_segmentation=mask_segmentation,
                                    mask_segment_id=mask_segment_id)
    command = console_command(input_volume_node, task, params=request.params, region=region,
                              anatomy_segmentation=anatomy_segmentation, mask_segmentation=mask_segmentation,
                              mask_segment_id=mask_segment_id, model=model, controlnet=controlnet, device=device)
    client = WorkerClient(**settings.client_options())
    client.start(task, request, model=model, controlnet=controlnet, device=device, on_progress=on_progress,
                 on_log=on_log)
    return Job(client, input_volume_node, task, request.params, output_volume, output_segmentation, command)


def _node_expression(node) -> str:
    return f"slicer.util.getNode({node.GetID()!r})"


def console_command(input_volume_node, task: str, *, params: Mapping[str, Any], region: Optional[str] = None,
                    anatomy_segmentation=None, mask_segmentation=None, mask_segment_id: Optional[str] = None,
                    model=None, controlnet=None, device: str = "auto") -> str:
    """The Python-console call that repeats a run (logged by the module), e.g.::

        slicer.util.getModuleLogic('MedDiffFM').process(slicer.util.getNode('vtkMRMLScalarVolumeNode1'),
            task='denoise', device='auto', steps=2)
    """
    args = [_node_expression(input_volume_node), f"task={task!r}"]
    if region not in (None, "", "auto"):
        args.append(f"region={region!r}")
    if anatomy_segmentation is not None:
        args.append(f"anatomySegmentation={_node_expression(anatomy_segmentation)}")
    if mask_segmentation is not None:
        args.append(f"maskSegmentation={_node_expression(mask_segmentation)}")
        if mask_segment_id:
            args.append(f"maskSegmentId={mask_segment_id!r}")
    for name, value in (("model", model), ("controlnet", controlnet)):
        if value:
            args.append(f"{name}={os.fspath(value)!r}")
    args.append(f"device={device!r}")
    args += [f"{name}={value!r}" for name, value in params.items()]
    return f"slicer.util.getModuleLogic('MedDiffFM').process({', '.join(args)})"


# ---------------------------------------------------------------------------------------------
# GPU memory check

# Bytes kept alive per voxel and feature channel during one window's forward pass at inference
# (the input and output of each convolution, normalisation and activation of a level, plus the
# decoder's skip tensors), in units of the element size. A conservative rough figure for this
# U-Net, not measured on a GPU: the check warns early rather than late.
ACTIVATION_TENSORS_PER_CHANNEL = 8
CUDA_CONTEXT_GB = 0.5


@dataclass(frozen=True)
class MemoryCheck:
    """Whether a run is expected to fit the GPU, and what to change when it does not.

    Attributes:
        fits: the estimate is below 90 % of the free memory (True when nothing is known).
        estimate_gb, free_gb: GiB (None when unknown: no GPU or no estimate).
        batch_size, window: settings that fit (the given ones when they do); window 0 = model's.
        use_cpu: nothing fits the GPU: run on the CPU.
        advice: one sentence for the user ("" when it fits).
    """

    fits: bool
    estimate_gb: Optional[float]
    free_gb: Optional[float]
    batch_size: int
    window: int
    advice: str = ""
    use_cpu: bool = False


def estimate_gpu_memory_gb(channels: list[int], window: int, batch_size: int, precision: str,
                           weights_bytes: int = 0) -> float:
    """Peak GPU memory of one sampling call, GiB: CUDA context + weights + activations.

    ``channels``: the U-Net's channels per level (each level has 1/8 of the voxels of the one
    above); ``window``: window edge in voxels; fp16 / bf16 / auto halve the activation bytes.
    """
    element = 4 if precision == "fp32" else 2
    voxels = float(window) ** 3
    per_window = sum(c * voxels / 8 ** level for level, c in enumerate(channels)) * ACTIVATION_TENSORS_PER_CHANNEL
    return CUDA_CONTEXT_GB + 2 * weights_bytes / 2**30 + batch_size * per_window * element / 2**30


def check_gpu_memory(info: Mapping[str, Any], model_config: Mapping[str, Any], *, window: int, batch_size: int,
                     precision: str = "auto", weights_bytes: int = 0, device: str = "auto") -> MemoryCheck:
    """Compare the estimate for these settings with the free GPU memory in ``info`` (the
    worker's ``--info``); suggest a smaller batch, then a smaller window, then the CPU."""
    free = info.get("gpu_free_gb")
    channels = list(model_config.get("channels") or [])
    model_window = int(model_config.get("window") or 0)
    use_window = window or model_window
    if device == "cpu" or not info.get("cuda") or free is None or not channels or not use_window:
        return MemoryCheck(True, None, free, batch_size, window)

    def estimate(w: int, b: int) -> float:
        return estimate_gpu_memory_gb(channels, w, b, precision, weights_bytes)

    budget = 0.9 * float(free)
    needed = estimate(use_window, batch_size)
    if needed <= budget:
        return MemoryCheck(True, round(needed, 2), free, batch_size, window)
    for b in range(batch_size - 1, 0, -1):
        if estimate(use_window, b) <= budget:
            return MemoryCheck(False, round(needed, 2), free, b, window,
                               f"This run needs about {needed:.1f} GB of GPU memory, {free:.1f} GB are free: "
                               f"use batch size {b} (slower, same result).")
    w = use_window
    while w > 8 and estimate(w, 1) > budget:
        w = max(8, (w * 3 // 4) // 8 * 8)
    if estimate(w, 1) <= budget:
        return MemoryCheck(False, round(needed, 2), free, 1, w,
                           f"This run needs about {needed:.1f} GB of GPU memory, {free:.1f} GB are free: "
                           f"use batch size 1 and window size {w}, or run on the CPU.")
    return MemoryCheck(False, round(needed, 2), free, batch_size, window,
                       f"This run needs about {needed:.1f} GB of GPU memory, only {free:.1f} GB are free: "
                       "run it on the CPU (Advanced -> Device), or close programs that use the GPU.", use_cpu=True)


def check_run_memory(info: Mapping[str, Any], task: str, params: Mapping[str, Any], *, model=None,
                     device: str = "auto") -> MemoryCheck:
    """:func:`check_gpu_memory` for a run of ``task`` with ``params`` on ``model`` (None: default)."""
    import json

    from MedDiffFMLib import weights
    from MedDiffFMLib.tasks.registry import task_spec

    model_dir = weights.resolve_model(model)
    config = json.loads((model_dir / weights.CONFIG_NAME).read_text(encoding="utf-8"))
    specs = task_spec(task).params
    value = {name: params.get(name, specs[name].default) for name in ("window", "batch_size", "precision")}
    return check_gpu_memory(info, config, window=int(value["window"]), batch_size=int(value["batch_size"]),
                            precision=str(value["precision"]),
                            weights_bytes=(model_dir / weights.WEIGHTS_NAME).stat().st_size, device=device)
