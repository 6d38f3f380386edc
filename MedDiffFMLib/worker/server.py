"""The worker process: ``python -m MedDiffFMLib.worker --request DIR`` (Slicer uses ``PythonSlicer``).

It reads one request folder (:mod:`.protocol`), runs :func:`MedDiffFMLib.tasks.run_task` on it,
prints progress and log lines, and writes the outputs. The library already retries a CUDA
out-of-memory error with smaller batches; an out-of-memory error that reaches the worker is
final and is reported with :data:`~.protocol.EXIT_OUT_OF_MEMORY` and advice.

Test hook: ``--task-runner module:function`` (or the ``MEDDIFFFM_TASK_RUNNER`` environment
variable) replaces ``run_task`` with any function of the same signature. Production never
sets it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..tasks.base import Cancelled, Progress, TaskResult
from ..tasks.registry import task_spec
from .protocol import (CANCEL_NAME, DONE_PREFIX, ERROR_PREFIX, EXIT_BAD_REQUEST, EXIT_CANCELLED, EXIT_FAILED,
                       EXIT_OK, EXIT_OUT_OF_MEMORY, INFO_PREFIX, LOG_PREFIX, OOM_MESSAGE, PROGRESS_PREFIX,
                       format_line, read_request, write_result)

ENV_TASK_RUNNER = "MEDDIFFFM_TASK_RUNNER"
DEFAULT_TASK_RUNNER = "MedDiffFMLib.tasks:run_task"


def emit(prefix: str, payload: Any = None, text: Optional[str] = None) -> None:
    """Print one protocol line for the client (ignored once the client is gone)."""
    try:
        sys.stdout.write(format_line(prefix, payload, text) + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass


def log(text: str) -> None:
    """A log line for the client (one line per call; newlines are flattened)."""
    for part in str(text).splitlines() or [""]:
        emit(LOG_PREFIX, text=part)


class _LogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            log(self.format(record))
        except Exception:  # never let logging break a run
            pass


def is_out_of_memory(exc: BaseException) -> bool:
    """An accelerator out-of-memory error, recognised without importing torch: the library's
    ``OutOfMemory`` (raised after its own retries), ``torch.cuda.OutOfMemoryError`` (or any class
    of that name) and a RuntimeError whose message says so."""
    names = {t.__name__ for t in type(exc).__mro__}
    if names & {"OutOfMemory", "OutOfMemoryError"}:
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


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (Windows and POSIX)."""
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
    while process_alive(pid):
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
        payload = dataclasses.asdict(p)
        key = (payload.get("step"), payload.get("stage"))
        now = time.monotonic()
        done = (payload.get("fraction") or 0.0) >= 1.0
        if key != self._last_key or done or now - self._last_time >= self.min_interval_s:
            self._last_time, self._last_key = now, key
            emit(PROGRESS_PREFIX, payload)


def _cancelled() -> int:
    emit(ERROR_PREFIX, {"kind": "cancelled", "message": "cancelled"})
    return EXIT_CANCELLED


def run_request(request_dir: Path, runner_spec: Optional[str] = None, parent_pid: Optional[int] = None) -> int:
    """Run the request in ``request_dir`` once; the exit code."""
    started = time.monotonic()
    try:
        task, request, options = read_request(request_dir)
        task_spec(task)  # an unknown task is refused before torch is imported
    except (ValueError, OSError, KeyError) as e:
        emit(ERROR_PREFIX, {"kind": "bad_request", "message": str(e)})
        return EXIT_BAD_REQUEST
    flag = _CancelFlag(request_dir)
    if parent_pid:
        threading.Thread(target=_watch_parent, args=(parent_pid, flag), daemon=True).start()
    try:
        runner = load_task_runner(runner_spec)
    except Exception as e:
        emit(ERROR_PREFIX, {"kind": "failed", "message": f"cannot load the task code: {type(e).__name__}: {e}"})
        return EXIT_FAILED
    log(f"task {task} on device {options.get('device') or 'auto'}; model {options.get('model') or 'default'}"
        + (f"; ControlNet {options['controlnet']}" if options.get("controlnet") else ""))
    try:
        result = runner(task, request, options.get("model"), controlnet=options.get("controlnet"),
                        device=options.get("device") or "auto", progress=_ProgressPrinter(), cancel=flag)
    except Cancelled:
        return _cancelled()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: B036 - report everything, in words
        if flag():
            return _cancelled()
        if is_out_of_memory(e):
            detail = str(e)
            del e
            _free_accelerator_memory()
            emit(ERROR_PREFIX, {"kind": "out_of_memory", "message": f"{OOM_MESSAGE} ({detail})"})
            return EXIT_OUT_OF_MEMORY
        if isinstance(e, (ValueError, FileNotFoundError)):
            emit(ERROR_PREFIX, {"kind": "failed", "message": str(e)})
            return EXIT_FAILED
        import traceback

        for line in traceback.format_exc().splitlines():
            log(line)
        emit(ERROR_PREFIX, {"kind": "failed", "message": f"{type(e).__name__}: {e}"})
        return EXIT_FAILED
    if flag():
        return _cancelled()
    for m in result.messages or []:
        log(m)
    elapsed = time.monotonic() - started
    write_result(request_dir, result, {"task": task, "elapsed_s": elapsed})
    emit(DONE_PREFIX, {"summary": result.summary or "", "elapsed_s": round(elapsed, 3)})
    return EXIT_OK


def environment_info(device: str = "auto") -> dict:
    """Python, torch and GPU facts for a status line and the memory check (imports torch).

    Keys: python, torch (version or None), cuda (bool), device ("cpu" or "cuda:N"), gpu_name,
    gpu_free_gb, gpu_total_gb (GiB, None without a GPU), error (only when something failed).
    """
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
        if info["cuda"] and (device or "auto").lower() != "cpu":
            idx = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(idx)
            info.update(device=f"cuda:{idx}", gpu_name=torch.cuda.get_device_name(idx),
                        gpu_free_gb=round(free / 2**30, 2), gpu_total_gb=round(total / 2**30, 2))
    except Exception as e:
        info["error"] = f"CUDA query failed: {e}"
    return info


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m MedDiffFMLib.worker",
                                     description="Run one MedDiffFM task from a request folder.")
    parser.add_argument("--request", help="request folder (request.json + inputs)")
    parser.add_argument("--task-runner", default=None,
                        help="test hook: 'module:function' used instead of MedDiffFMLib.tasks:run_task")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the launching application) is gone")
    parser.add_argument("--info", action="store_true", help="print torch / GPU facts as one JSON line and exit")
    parser.add_argument("--device", default="auto", help="with --info: the device to describe")
    args = parser.parse_args(argv)
    if args.info:
        emit(INFO_PREFIX, environment_info(args.device))
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
        return run_request(Path(args.request), args.task_runner, args.parent_pid)
    finally:
        root.removeHandler(handler)
