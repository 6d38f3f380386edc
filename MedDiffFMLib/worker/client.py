"""The client side: start the worker process, stream its progress, cancel it, load its result.

Plain Python (subprocess and a reader thread, no Qt). Callbacks run in the thread that calls
:meth:`WorkerClient.poll` or :meth:`WorkerClient.wait`, so a GUI polls from a timer on its main
thread; :meth:`WorkerClient.collect` (reading the result files) may then run on another thread.
"""

from __future__ import annotations

import collections
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from ..tasks.base import Cancelled, Progress, TaskRequest, TaskResult, as_cancel_flag
from .protocol import (EXIT_CANCELLED, EXIT_OK, EXIT_OUT_OF_MEMORY, WorkerError, WorkerOutOfMemory, parse_line,
                       read_result, write_request)

# Windows: no console window for the child (PythonSlicer is a console program) and its own
# process group so that a cancel reaches its children.
_CREATE_NEW_PROCESS_GROUP = 0x00000200
_CREATE_NO_WINDOW = 0x08000000


def library_parent() -> str:
    """The folder that holds the ``MedDiffFMLib`` package (what the worker needs on PYTHONPATH)."""
    return str(Path(__file__).resolve().parent.parent.parent)


def popen_kwargs(os_name: str = os.name) -> dict[str, Any]:
    """Process-creation options for every child this client starts (the worker and ``--info``)."""
    if os_name == "nt":
        return {"creationflags": _CREATE_NEW_PROCESS_GROUP | _CREATE_NO_WINDOW}
    return {"start_new_session": True}


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill a worker and everything it started."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=False, **popen_kwargs())
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


def worker_environment(pythonpath: list[str], env: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment with ``pythonpath`` in front and ``env`` on top."""
    out = dict(os.environ)
    out.update(env or {})
    paths = list(pythonpath) + ([out["PYTHONPATH"]] if out.get("PYTHONPATH") else [])
    out["PYTHONPATH"] = os.pathsep.join(paths)
    out["PYTHONUNBUFFERED"] = "1"
    out["PYTHONIOENCODING"] = "utf-8"
    out.setdefault("TQDM_DISABLE", "1")
    return out


class WorkerClient:
    """One task in a worker process.

    Example::

        client = WorkerClient()
        client.start("denoise", TaskRequest(image=vol, params={"steps": 2}),
                     on_progress=lambda p: print(p.fraction), on_log=print)
        while client.poll():          # from a GUI: call poll() from a timer instead
            time.sleep(0.1)
        result = client.collect()     # TaskResult; raises WorkerError / Cancelled

    Args:
        python: interpreter for the worker (Slicer: ``PythonSlicer``); default this one.
        pythonpath: folders put in front of ``PYTHONPATH`` (default: the folder holding
            ``MedDiffFMLib``, so the bundled library is found).
        env: extra environment variables (e.g. ``MEDDIFFFM_MODELS_DIR``).
        work_root: where request folders are made (default: the system temp folder).
        task_runner: test hook passed as ``--task-runner``.
        keep_files: keep the request folder after the result is collected (for debugging).
        watch_parent: the worker exits when this process dies.
    """

    def __init__(self, python: Optional[str] = None, *, pythonpath: Optional[list[str]] = None,
                 env: Optional[dict[str, str]] = None, work_root: Optional[os.PathLike | str] = None,
                 task_runner: Optional[str] = None, keep_files: bool = False, watch_parent: bool = True):
        self.python = python or sys.executable
        self.pythonpath = list(pythonpath) if pythonpath is not None else [library_parent()]
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

    def command(self) -> list[str]:
        cmd = [self.python, "-m", "MedDiffFMLib.worker", "--request", str(self.request_dir)]
        if self.task_runner:
            cmd += ["--task-runner", self.task_runner]
        if self.watch_parent:
            cmd += ["--parent-pid", str(os.getpid())]
        return cmd

    def start(self, task: str, request: TaskRequest, *, model: Optional[os.PathLike | str] = None,
              controlnet: Optional[os.PathLike | str] = None, device: str = "auto",
              on_progress: Optional[Callable[[Progress], None]] = None,
              on_log: Optional[Callable[[str], None]] = None) -> None:
        """Write the request and launch the worker (returns at once)."""
        if self.proc is not None:
            raise RuntimeError("this WorkerClient was already started; make a new one")
        self._on_progress, self._on_log = on_progress, on_log
        self.request_dir = Path(tempfile.mkdtemp(prefix="meddifffm-", dir=self.work_root))
        try:
            write_request(self.request_dir, task, request, model=model, controlnet=controlnet, device=device)
            self.proc = subprocess.Popen(
                self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=worker_environment(self.pythonpath, self.env), cwd=str(self.request_dir), text=True,
                encoding="utf-8", errors="replace", bufsize=1, **popen_kwargs())
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
                self._queue.put(parse_line(line))
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

    def collect(self) -> TaskResult:
        """The outputs of a worker that has exited (after :meth:`poll` returned False).

        Runs no callbacks and touches only files, so it may run on a background thread.
        Removes the request folder (unless ``keep_files``).

        Raises:
            Cancelled: after :meth:`cancel`, or when the worker reports it.
            WorkerOutOfMemory: the GPU ran out of memory.
            WorkerError: any other failure, with the worker's message.
        """
        if self.cancelled:
            raise Cancelled("cancelled")
        if self.returncode is None:
            raise RuntimeError("the worker is still running; poll() until it returns False first")
        rc = self.returncode
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

    def result(self, timeout: Optional[float] = None) -> TaskResult:
        """Wait for the worker (callbacks run here) and :meth:`collect` its outputs."""
        if self.cancelled:
            raise Cancelled("cancelled")
        self.wait(timeout)
        return self.collect()

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


class WorkerRunner:
    """A runner with :func:`MedDiffFMLib.tasks.run_task`'s signature that runs each task in a
    worker process (blocking). ``client_options`` go to :class:`WorkerClient`; ``on_log``
    receives the worker's log lines."""

    def __init__(self, *, on_log: Optional[Callable[[str], None]] = None, poll_interval: float = 0.1,
                 **client_options: Any):
        self.on_log = on_log
        self.poll_interval = poll_interval
        self.client_options = client_options

    def __call__(self, task: str, request: TaskRequest, model: Optional[os.PathLike | str] = None, *,
                 controlnet: Optional[os.PathLike | str] = None, device: str = "auto", progress=None,
                 cancel=None) -> TaskResult:
        is_cancelled = as_cancel_flag(cancel)
        client = WorkerClient(**self.client_options)
        client.start(task, request, model=model, controlnet=controlnet, device=device, on_progress=progress,
                     on_log=self.on_log)
        try:
            while client.poll():
                if is_cancelled():
                    client.cancel()
                    raise Cancelled("cancelled")
                time.sleep(self.poll_interval)
            return client.collect()
        finally:
            client.cleanup()


def query_environment(python: Optional[str] = None, *, pythonpath: Optional[list[str]] = None,
                      env: Optional[dict[str, str]] = None, device: str = "auto", timeout: float = 180.0) -> dict:
    """Run ``--info`` in a worker interpreter (so the caller need not import torch): the dict of
    :func:`MedDiffFMLib.worker.server.environment_info`, or ``{"torch": None, "error": ...}``."""
    cmd = [python or sys.executable, "-m", "MedDiffFMLib.worker", "--info", "--device", device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL,
                              env=worker_environment(pythonpath if pythonpath is not None else [library_parent()],
                                                     env),
                              **popen_kwargs())
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"torch": None, "error": f"{type(e).__name__}: {e}"}
    for line in proc.stdout.splitlines():
        kind, payload = parse_line(line)
        if kind == "info":
            return payload
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
    return {"torch": None, "error": " ".join(tail) or f"exit code {proc.returncode}"}
