"""Run one task in a separate process, and the client that drives it.

Why a process: a GUI (3D Slicer) must stay responsive while a task runs for minutes, a cancel
must stop the GPU work at once (killing a thread is impossible; killing a process is not), and
a CUDA out-of-memory error or a crash must not take the application down with it.

Worker (``python -m MedDiffFMLib.worker --request DIR``; Slicer uses ``PythonSlicer``):

* ``DIR/request.json`` names the task, its parameters, region, model, ControlNet, device and
  anatomy class names; the input images are ``DIR/image.npz``, ``DIR/anatomy.npz`` and
  ``DIR/mask.npz`` (``array`` in (k, j, i) order and the 4x4 ``ijk_to_ras``: exact, no
  resampling, no orientation conventions to get wrong).
* stdout carries machine-readable lines, one JSON object each::

      MEDDIFFFM_PROGRESS {"step": 3, "total_steps": 20, "window": 5, "total_windows": 8,
                          "stage": "sampling", "fraction": 0.17, "eta_s": 41.0}
      MEDDIFFFM_LOG <free text>
      MEDDIFFFM_ERROR {"kind": "out_of_memory" | "cancelled" | "bad_request" | "failed", "message": "..."}
      MEDDIFFFM_DONE {"summary": "...", "elapsed_s": 12.3}

  Any other line (a traceback, a library's print) is plain log text.
* Outputs are written to ``DIR/out.tmp/`` and renamed to ``DIR/out/`` only on success, so a
  killed or failed worker leaves no output behind. ``DIR/out/result.json`` lists the files.
* A CUDA out-of-memory error is retried with half the batch size, down to 1; after that the
  worker exits with :data:`EXIT_OUT_OF_MEMORY` and a message that suggests the CPU.
* Exit codes: :data:`EXIT_OK`, :data:`EXIT_FAILED`, :data:`EXIT_BAD_REQUEST`,
  :data:`EXIT_OUT_OF_MEMORY`, :data:`EXIT_CANCELLED`.

Test hook: ``--task-runner module:function`` (or the ``MEDDIFFFM_TASK_RUNNER`` environment
variable) replaces :func:`MedDiffFMLib.tasks.run_task` with any function of the same signature.
Production never sets it.

Client: :class:`WorkerClient` (plain Python: subprocess and a reader thread, no Qt). Callbacks
run in the thread that calls :meth:`WorkerClient.poll` or :meth:`WorkerClient.wait`, so a GUI
polls from a timer on its main thread.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import importlib
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .tasks.base import Cancelled, Progress, TaskRequest, TaskResult
from .volume import Volume

PROTOCOL_VERSION = 1

PROGRESS_PREFIX = "MEDDIFFFM_PROGRESS"
LOG_PREFIX = "MEDDIFFFM_LOG"
ERROR_PREFIX = "MEDDIFFFM_ERROR"
DONE_PREFIX = "MEDDIFFFM_DONE"
INFO_PREFIX = "MEDDIFFFM_INFO"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_REQUEST = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_CANCELLED = 4

REQUEST_NAME = "request.json"
RESULT_NAME = "result.json"
OUT_NAME = "out"
OUT_TMP_NAME = "out.tmp"
CANCEL_NAME = "cancel"
INPUT_FILES = {"image": "image.npz", "anatomy": "anatomy.npz", "mask": "mask.npz"}

ENV_TASK_RUNNER = "MEDDIFFFM_TASK_RUNNER"
DEFAULT_TASK_RUNNER = "MedDiffFMLib.tasks:run_task"

OOM_MESSAGE = (
    "The GPU ran out of memory even with batch size 1. Choose the CPU as device (slower, but it has "
    "the memory), use a smaller window size, or close other programs that use the GPU.")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class WorkerError(RuntimeError):
    """The worker failed; ``kind`` and ``returncode`` say how, ``message`` says why in words."""

    def __init__(self, message: str, kind: str = "failed", returncode: Optional[int] = None, log: str = ""):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.returncode = returncode
        self.log = log


class WorkerOutOfMemory(WorkerError):
    """The GPU ran out of memory even with batch size 1."""


# ---------------------------------------------------------------------------------------------
# Files


def save_volume(path: Path, volume: Volume) -> None:
    np.savez(path, array=np.ascontiguousarray(volume.array), ijk_to_ras=np.asarray(volume.ijk_to_ras, np.float64))


def load_volume(path: Path) -> Volume:
    with np.load(path, allow_pickle=False) as z:
        return Volume(z["array"], z["ijk_to_ras"])


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_request(directory: os.PathLike | str, task: str, request: TaskRequest, *,
                  model: Optional[os.PathLike | str] = None, controlnet: Optional[str] = None,
                  device: str = "auto", filter_params: bool = False) -> Path:
    """Write a request directory for the worker. ``filter_params`` drops parameters the task does
    not take (for UIs that send every field); otherwise unknown parameters are an error."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for key, fname in INPUT_FILES.items():
        vol = getattr(request, key)
        if vol is not None:
            save_volume(d / fname, vol)
            inputs[key] = fname
    payload = {
        "protocol": PROTOCOL_VERSION,
        "task": task,
        "params": _jsonable(dict(request.params or {})),
        "region": request.region,
        "anatomy_names": None if request.anatomy_names is None
        else {str(int(k)): str(v) for k, v in request.anatomy_names.items()},
        "model": None if model is None else os.fspath(model),
        "controlnet": None if controlnet is None else os.fspath(controlnet),
        "device": device or "auto",
        "filter_params": bool(filter_params),
        "inputs": inputs,
    }
    tmp = d / (REQUEST_NAME + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(tmp, d / REQUEST_NAME)
    return d


def read_request(directory: os.PathLike | str) -> tuple[str, TaskRequest, dict]:
    """(task, request, options) from a request directory; ValueError when it is malformed."""
    d = Path(directory)
    try:
        payload = json.loads((d / REQUEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"{d / REQUEST_NAME} does not exist") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / REQUEST_NAME} is not valid JSON: {e}") from e
    if not isinstance(payload, dict) or payload.get("protocol") != PROTOCOL_VERSION:
        raise ValueError(f"{d / REQUEST_NAME}: unsupported request (protocol {payload.get('protocol')!r})")
    task = payload.get("task")
    if not isinstance(task, str):
        raise ValueError("request.json: 'task' is missing")
    vols = {}
    for key, fname in (payload.get("inputs") or {}).items():
        if key not in INPUT_FILES or fname != INPUT_FILES[key]:
            raise ValueError(f"request.json: unexpected input {key!r}: {fname!r}")
        vols[key] = load_volume(d / fname)
    names = payload.get("anatomy_names")
    request = TaskRequest(
        image=vols.get("image"), region=payload.get("region"), anatomy=vols.get("anatomy"),
        anatomy_names=None if names is None else {int(k): v for k, v in names.items()},
        mask=vols.get("mask"), params=dict(payload.get("params") or {}))
    options = {k: payload.get(k) for k in ("model", "controlnet", "device", "filter_params")}
    return task, request, options


def write_result(directory: os.PathLike | str, result: TaskResult, extra: Optional[dict] = None) -> Path:
    """Write outputs to ``out.tmp/`` and rename it to ``out/`` (atomic on one file system)."""
    d = Path(directory)
    tmp, out = d / OUT_TMP_NAME, d / OUT_NAME
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "volumes": {}, "segmentations": {}}
    for group in ("volumes", "segmentations"):
        items = getattr(result, group) or {}
        if items:
            (tmp / group).mkdir()
        for name, vol in items.items():
            if not _NAME.match(name):
                raise ValueError(f"output name {name!r} is not a simple identifier")
            rel = f"{group}/{name}.npz"
            save_volume(tmp / rel, vol)
            manifest[group][name] = rel
    manifest["scores"] = {k: float(v) for k, v in (result.scores or {}).items()}
    manifest["summary"] = result.summary or ""
    manifest["messages"] = [str(m) for m in (getattr(result, "messages", None) or [])]
    manifest.update(extra or {})
    (tmp / RESULT_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_result(directory: os.PathLike | str) -> TaskResult:
    """Load ``DIR/out/`` (or an ``out`` directory itself) into a TaskResult."""
    d = Path(directory)
    out = d if (d / RESULT_NAME).is_file() else d / OUT_NAME
    manifest = json.loads((out / RESULT_NAME).read_text(encoding="utf-8"))
    result = TaskResult(
        volumes={k: load_volume(out / v) for k, v in manifest.get("volumes", {}).items()},
        segmentations={k: load_volume(out / v) for k, v in manifest.get("segmentations", {}).items()},
        scores=dict(manifest.get("scores", {})),
        summary=manifest.get("summary", ""))
    if hasattr(result, "messages"):
        result.messages = list(manifest.get("messages", []))
    return result


# ---------------------------------------------------------------------------------------------
# Worker side


def _emit(prefix: str, payload: Any = None, text: Optional[str] = None) -> None:
    line = prefix + " " + (text if text is not None else json.dumps(_jsonable(payload)))
    try:
        sys.stdout.write(line.replace("\n", " ") + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # the client is gone
        pass


def log(text: str) -> None:
    """A log line for the client (one line per call; newlines are flattened)."""
    for part in str(text).splitlines() or [""]:
        _emit(LOG_PREFIX, text=part)


class _LogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            log(self.format(record))
        except Exception:  # never let logging break a run
            pass


def is_final_out_of_memory(exc: BaseException) -> bool:
    """The library's own ``OutOfMemory``: it already retried down to batch size 1."""
    return any(t.__name__ == "OutOfMemory" for t in type(exc).__mro__)


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or other accelerator) out-of-memory error, without importing torch."""
    if is_final_out_of_memory(exc):
        return True
    torch = sys.modules.get("torch")
    oom_type = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    if any(t.__name__ == "OutOfMemoryError" for t in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_accelerator_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            pass


def load_task_runner(spec: Optional[str] = None) -> Callable[..., TaskResult]:
    """``module:function`` -> the function (default :func:`MedDiffFMLib.tasks.run_task`)."""
    spec = spec or os.environ.get(ENV_TASK_RUNNER) or DEFAULT_TASK_RUNNER
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"task runner must be 'module:function', got {spec!r}")
    return getattr(importlib.import_module(mod_name), fn_name)


def _task_params(runner: Callable) -> Optional[dict]:
    module = sys.modules.get(getattr(runner, "__module__", "") or "")
    params = getattr(module, "TASK_PARAMS", None)
    return params if isinstance(params, dict) else None


class _CancelFlag:
    """True once ``DIR/cancel`` exists or the launching process died (file checked at most 4x/s)."""

    def __init__(self, request_dir: Path):
        self.path = request_dir / CANCEL_NAME
        self.event = threading.Event()
        self._last = 0.0

    def __call__(self) -> bool:
        if self.event.is_set():
            return True
        now = time.monotonic()
        if now - self._last >= 0.25:
            self._last = now
            if self.path.exists():
                self.event.set()
        return self.event.is_set()


def _process_alive(pid: int) -> bool:
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch_parent(pid: int, flag: _CancelFlag, interval_s: float = 2.0) -> None:
    """Exit when the launching application (``pid``) is gone: no orphaned GPU jobs."""
    while _process_alive(pid):
        time.sleep(interval_s)
    flag.event.set()
    time.sleep(5.0)  # give the task a moment to notice the flag, then go
    os._exit(EXIT_CANCELLED)


class _ProgressPrinter:
    def __init__(self, min_interval_s: float = 0.1):
        self.min_interval_s = min_interval_s
        self._last_time = 0.0
        self._last_key: Any = None

    def __call__(self, p: Progress) -> None:
        payload = dataclasses.asdict(p) if dataclasses.is_dataclass(p) else dict(vars(p))
        key = (payload.get("step"), payload.get("stage"))
        now = time.monotonic()
        done = (payload.get("fraction") or 0.0) >= 1.0
        if key != self._last_key or done or now - self._last_time >= self.min_interval_s:
            self._last_time, self._last_key = now, key
            _emit(PROGRESS_PREFIX, payload)


def _run(request_dir: Path, runner_spec: Optional[str], parent_pid: Optional[int]) -> int:
    started = time.monotonic()
    try:
        task, request, options = read_request(request_dir)
    except (ValueError, OSError, KeyError) as e:
        _emit(ERROR_PREFIX, {"kind": "bad_request", "message": str(e)})
        return EXIT_BAD_REQUEST
    flag = _CancelFlag(request_dir)
    if parent_pid:
        threading.Thread(target=_watch_parent, args=(parent_pid, flag), daemon=True).start()
    try:
        runner = load_task_runner(runner_spec)
    except Exception as e:
        _emit(ERROR_PREFIX, {"kind": "failed", "message": f"cannot load the task code: {type(e).__name__}: {e}"})
        return EXIT_FAILED
    params = dict(request.params)
    specs = _task_params(runner)
    task_specs = specs.get(task) if specs is not None else None
    if options.get("filter_params") and task_specs is not None:
        dropped = sorted(set(params) - set(task_specs))
        for name in dropped:
            params.pop(name)
        if dropped:
            log(f"task {task} does not use {', '.join(dropped)}; ignored")
    batch = params.get("batch_size")
    if batch is None and task_specs is not None and "batch_size" in task_specs:
        batch = getattr(task_specs["batch_size"], "default", None)
    log(f"task {task} on device {options.get('device') or 'auto'}; model {options.get('model') or 'default'}"
        + (f"; ControlNet {options['controlnet']}" if options.get("controlnet") else ""))
    printer = _ProgressPrinter()
    while True:
        run_params = dict(params)
        if batch is not None and (task_specs is None or "batch_size" in task_specs):
            run_params["batch_size"] = int(batch)
        req = dataclasses.replace(request, params=run_params)
        try:
            result = runner(task, req, options.get("model"), controlnet=options.get("controlnet"),
                            device=options.get("device") or "auto", progress=printer, cancel=flag)
            break
        except Cancelled:
            _emit(ERROR_PREFIX, {"kind": "cancelled", "message": "cancelled"})
            return EXIT_CANCELLED
        except BaseException as e:  # noqa: B036 - report everything, in words
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if flag():
                _emit(ERROR_PREFIX, {"kind": "cancelled", "message": "cancelled"})
                return EXIT_CANCELLED
            if is_out_of_memory(e):
                final = is_final_out_of_memory(e)
                detail = str(e)
                del e
                _free_accelerator_memory()
                if final:
                    _emit(ERROR_PREFIX, {"kind": "out_of_memory", "message": f"{OOM_MESSAGE} ({detail})"})
                    return EXIT_OUT_OF_MEMORY
                if batch is not None and int(batch) > 1:
                    batch = max(1, int(batch) // 2)
                    log(f"out of GPU memory; retrying with batch size {batch}")
                    continue
                _emit(ERROR_PREFIX, {"kind": "out_of_memory", "message": OOM_MESSAGE})
                return EXIT_OUT_OF_MEMORY
            if isinstance(e, (ValueError, FileNotFoundError)):
                _emit(ERROR_PREFIX, {"kind": "failed", "message": str(e)})
                return EXIT_FAILED
            import traceback

            for line in traceback.format_exc().splitlines():
                log(line)
            _emit(ERROR_PREFIX, {"kind": "failed", "message": f"{type(e).__name__}: {e}"})
            return EXIT_FAILED
    if flag():
        _emit(ERROR_PREFIX, {"kind": "cancelled", "message": "cancelled"})
        return EXIT_CANCELLED
    for m in getattr(result, "messages", None) or []:
        log(m)
    elapsed = time.monotonic() - started
    write_result(request_dir, result, {"task": task, "elapsed_s": elapsed, "batch_size": batch})
    _emit(DONE_PREFIX, {"summary": result.summary or "", "elapsed_s": round(elapsed, 3)})
    return EXIT_OK


def environment_info(device: str = "auto") -> dict:
    """Python, torch and GPU facts for a status line (imports torch)."""
    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": None, "cuda": False, "device": "cpu",
                            "gpu_name": None, "gpu_free_gb": None, "gpu_total_gb": None}
    try:
        import torch
    except Exception as e:  # not installed yet
        info["error"] = f"torch is not available: {e}"
        return info
    info["torch"] = torch.__version__
    try:
        info["cuda"] = bool(torch.cuda.is_available())
        if info["cuda"] and (device or "auto").lower() not in ("cpu",):
            idx = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(idx)
            info.update(device=f"cuda:{idx}", gpu_name=torch.cuda.get_device_name(idx),
                        gpu_free_gb=round(free / 2**30, 2), gpu_total_gb=round(total / 2**30, 2))
    except Exception as e:
        info["error"] = f"CUDA query failed: {e}"
    return info


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedDiffFMLib.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--request", help="request directory (request.json + inputs)")
    parser.add_argument("--task-runner", default=None,
                        help="test hook: 'module:function' used instead of MedDiffFMLib.tasks:run_task")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the launching application) is gone")
    parser.add_argument("--info", action="store_true", help="print torch / GPU facts as one JSON line and exit")
    parser.add_argument("--device", default="auto", help="with --info: the device to describe")
    args = parser.parse_args(argv)
    if args.info:
        _emit(INFO_PREFIX, environment_info(args.device))
        return EXIT_OK
    if not args.request:
        parser.error("--request is required")
    handler = _LogHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        return _run(Path(args.request), args.task_runner, args.parent_pid)
    finally:
        root.removeHandler(handler)


# ---------------------------------------------------------------------------------------------
# Client side


def _parse_line(line: str) -> tuple[str, Any]:
    """One stdout line -> (kind, payload): progress / log / error / done / info / text."""
    line = line.rstrip("\r\n")
    prefix, _, rest = line.partition(" ")
    if prefix == LOG_PREFIX:
        return "log", rest
    if prefix in (PROGRESS_PREFIX, ERROR_PREFIX, DONE_PREFIX, INFO_PREFIX):
        try:
            payload = json.loads(rest)
        except json.JSONDecodeError:
            return "text", line
        if prefix == PROGRESS_PREFIX:
            fields = {f.name for f in dataclasses.fields(Progress)}
            kwargs = {k: v for k, v in payload.items() if k in fields}
            kwargs.setdefault("step", 0)
            kwargs.setdefault("total_steps", 0)
            return "progress", Progress(**kwargs)
        return {ERROR_PREFIX: "error", DONE_PREFIX: "done", INFO_PREFIX: "info"}[prefix], payload
    return "text", line


def _library_parent() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a worker and everything it started."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False)
        try:
            proc.kill()
        except OSError:
            pass
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session=True: the group id is the pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except OSError:
        pass


class WorkerClient:
    """Start the worker on one request, stream its progress, cancel it, load its result.

    Example::

        client = WorkerClient()
        client.start("denoise", TaskRequest(image=vol, params={"steps": 10}),
                     on_progress=lambda p: print(p.fraction), on_log=print)
        while client.poll():          # from a GUI: call poll() from a timer instead
            time.sleep(0.1)
        result = client.result()      # TaskResult; raises WorkerError / Cancelled

    Args:
        python: interpreter for the worker (Slicer: ``PythonSlicer``); default this one.
        pythonpath: folders put in front of ``PYTHONPATH`` (default: the folder holding
            ``MedDiffFMLib``, so the bundled library is found).
        env: extra environment variables (e.g. ``MEDDIFFFM_MODELS_DIR``).
        work_root: where request folders are made (default: the system temp folder).
        task_runner: test hook passed as ``--task-runner``.
        keep_files: keep the request folder after :meth:`result` (for debugging).
        watch_parent: the worker exits when this process dies.
    """

    def __init__(self, python: Optional[str] = None, *, pythonpath: Optional[list[str]] = None,
                 env: Optional[dict[str, str]] = None, work_root: Optional[os.PathLike | str] = None,
                 task_runner: Optional[str] = None, keep_files: bool = False, watch_parent: bool = True):
        self.python = python or sys.executable
        self.pythonpath = list(pythonpath) if pythonpath is not None else [_library_parent()]
        self.env = dict(env or {})
        self.work_root = None if work_root is None else str(work_root)
        self.task_runner = task_runner
        self.keep_files = keep_files
        self.watch_parent = watch_parent
        self.request_dir: Optional[Path] = None
        self.proc: Optional[subprocess.Popen] = None
        self.returncode: Optional[int] = None
        self.cancelled = False
        self.error: Optional[dict] = None
        self.done: Optional[dict] = None
        self.last_progress: Optional[Progress] = None
        self.log_lines: collections.deque[str] = collections.deque(maxlen=5000)
        self._queue: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._on_progress: Optional[Callable[[Progress], None]] = None
        self._on_log: Optional[Callable[[str], None]] = None
        self._exited = False

    # -- lifecycle ---------------------------------------------------------------------------

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        paths = self.pythonpath + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        env.setdefault("TQDM_DISABLE", "1")
        return env

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "MedDiffFMLib.worker", "--request", str(self.request_dir)]
        if self.task_runner:
            cmd += ["--task-runner", self.task_runner]
        if self.watch_parent:
            cmd += ["--parent-pid", str(os.getpid())]
        return cmd

    def start(self, task: str, request: TaskRequest, *, model: Optional[os.PathLike | str] = None,
              controlnet: Optional[str] = None, device: str = "auto", filter_params: bool = False,
              on_progress: Optional[Callable[[Progress], None]] = None,
              on_log: Optional[Callable[[str], None]] = None) -> None:
        """Write the request and launch the worker (returns at once)."""
        if self.proc is not None:
            raise RuntimeError("this WorkerClient was already started; make a new one")
        self._on_progress, self._on_log = on_progress, on_log
        self.request_dir = Path(tempfile.mkdtemp(prefix="meddifffm-", dir=self.work_root))
        try:
            write_request(self.request_dir, task, request, model=model, controlnet=controlnet, device=device,
                          filter_params=filter_params)
            kwargs: dict[str, Any] = {}
            if os.name == "nt":
                kwargs["creationflags"] = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                                           | getattr(subprocess, "CREATE_NO_WINDOW", 0))
            else:
                kwargs["start_new_session"] = True
            self.proc = subprocess.Popen(
                self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._environment(), cwd=str(self.request_dir), text=True, encoding="utf-8",
                errors="replace", bufsize=1, **kwargs)
        except BaseException:
            shutil.rmtree(self.request_dir, ignore_errors=True)
            raise
        self._reader = threading.Thread(target=self._read, name="meddifffm-worker-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        try:
            for line in proc.stdout:
                self._queue.put(_parse_line(line))
        except (ValueError, OSError):
            pass
        rc = proc.wait()
        self._queue.put(("exit", rc))

    @property
    def running(self) -> bool:
        return self.proc is not None and not self._exited

    def poll(self) -> bool:
        """Handle pending worker output (runs the callbacks here); True while the worker runs."""
        while True:
            try:
                kind, payload = self._queue.get_nowait()
            except queue.Empty:
                break
            self._dispatch(kind, payload)
        return self.running

    def _dispatch(self, kind: str, payload: Any) -> None:
        if kind == "progress":
            self.last_progress = payload
            if self._on_progress is not None:
                self._on_progress(payload)
        elif kind in ("log", "text"):
            self.log_lines.append(payload)
            if self._on_log is not None:
                self._on_log(payload)
        elif kind == "error":
            self.error = payload
            self.log_lines.append(f"error: {payload.get('message')}")
            if self._on_log is not None:
                self._on_log(f"error: {payload.get('message')}")
        elif kind == "done":
            self.done = payload
        elif kind == "exit":
            self.returncode = payload
            self._exited = True

    def wait(self, timeout: Optional[float] = None, interval: float = 0.05) -> int:
        """Block until the worker exits (running callbacks meanwhile); its exit code."""
        if self.proc is None:
            raise RuntimeError("the worker was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not finish within {timeout} s")
            time.sleep(interval)
        assert self.returncode is not None
        return self.returncode

    def cancel(self) -> None:
        """Kill the worker and its children at once; remove the request folder. No output survives."""
        self.cancelled = True
        proc = self.proc
        if proc is not None and not self._exited:
            _kill_tree(proc)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            if self._reader is not None:
                self._reader.join(timeout=10)
            self.poll()
            try:
                if proc.stdout is not None:
                    proc.stdout.close()
            except OSError:
                pass
        self._remove_files()

    def _remove_files(self) -> None:
        if self.request_dir is not None and self.request_dir.exists():
            shutil.rmtree(self.request_dir, ignore_errors=True)

    def cleanup(self) -> None:
        """Stop the worker if it still runs and remove its files."""
        if self.running:
            self.cancel()
        else:
            if self.proc is not None and getattr(self.proc, "stdout", None) is not None:
                try:
                    self.proc.stdout.close()
                except OSError:
                    pass
            self._remove_files()

    def result(self, timeout: Optional[float] = None) -> TaskResult:
        """Wait for the worker and load its outputs.

        Raises:
            Cancelled: after :meth:`cancel`, or when the worker reports it.
            WorkerOutOfMemory: the GPU ran out of memory even with batch size 1.
            WorkerError: any other failure, with the worker's message.
        """
        if self.cancelled:
            raise Cancelled("cancelled")
        rc = self.wait(timeout)
        try:
            if rc == EXIT_OK:
                return read_result(self.request_dir)
            err = self.error or {}
            kind = err.get("kind", "failed")
            if rc == EXIT_CANCELLED or kind == "cancelled":
                raise Cancelled("cancelled")
            message = err.get("message") or self._tail() or f"the worker exited with code {rc}"
            if rc == EXIT_OUT_OF_MEMORY or kind == "out_of_memory":
                raise WorkerOutOfMemory(message, "out_of_memory", rc, self._tail())
            raise WorkerError(message, kind, rc, self._tail())
        finally:
            if not self.keep_files:
                self.cleanup()

    def _tail(self, n: int = 20) -> str:
        return "\n".join(list(self.log_lines)[-n:])

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def __del__(self) -> None:
        try:
            if self.running:
                self.cancel()
        except Exception:
            pass


def run_in_worker(task: str, request: TaskRequest, model: Optional[os.PathLike | str] = None, *,
                  controlnet: Optional[str] = None, device: str = "auto", progress=None, cancel=None,
                  log_callback: Optional[Callable[[str], None]] = None, filter_params: bool = False,
                  poll_interval: float = 0.1, **client_kwargs) -> TaskResult:
    """Like :func:`MedDiffFMLib.tasks.run_task`, but in a worker process (blocking)."""
    from .tasks.base import as_cancel_flag

    is_cancelled = as_cancel_flag(cancel)
    client = WorkerClient(**client_kwargs)
    client.start(task, request, model=model, controlnet=controlnet, device=device, filter_params=filter_params,
                 on_progress=progress, on_log=log_callback)
    try:
        while client.poll():
            if is_cancelled():
                client.cancel()
                raise Cancelled("cancelled")
            time.sleep(poll_interval)
        return client.result()
    finally:
        client.cleanup()


def query_environment(python: Optional[str] = None, *, pythonpath: Optional[list[str]] = None,
                      env: Optional[dict[str, str]] = None, device: str = "auto", timeout: float = 180.0) -> dict:
    """Run ``--info`` in a worker interpreter (so the caller need not import torch)."""
    client = WorkerClient(python, pythonpath=pythonpath, env=env, watch_parent=False)
    proc = subprocess.run([client.python, "-m", "MedDiffFMLib.worker", "--info", "--device", device],
                          capture_output=True, text=True, env=client._environment(), timeout=timeout, check=False)
    for line in proc.stdout.splitlines():
        kind, payload = _parse_line(line)
        if kind == "info":
            return payload
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    return {"torch": None, "error": " ".join(tail) or f"exit code {proc.returncode}"}


if __name__ == "__main__":
    sys.exit(main())
