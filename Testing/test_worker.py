"""The worker process and its client: real subprocesses, progress lines, cancel, errors.

Most cases run the test double ``Testing/fake_task_runner.py`` through the worker's
``--task-runner`` hook; ``test_real_task_in_the_worker_with_a_tiny_model`` drives the real
``run_task`` end to end.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MedDiffFMLib import worker
from MedDiffFMLib.tasks.base import Cancelled, Progress, TaskRequest, TaskResult
from MedDiffFMLib.volume import Volume
from MedDiffFMLib.worker import WorkerClient, WorkerError, WorkerOutOfMemory, WorkerRunner, client as worker_client
from MedDiffFMLib.worker import server

TESTING = Path(__file__).resolve().parent
ROOT = TESTING.parent
RUNNER = "fake_task_runner:run_task"


def oblique(shape=(5, 6, 7)):
    m = np.eye(4)
    m[:3, :3] = np.array([[0.0, -0.8, 0.1], [0.7, 0.0, 0.0], [0.0, 0.05, 2.5]])
    m[:3, 3] = [10.5, -3.25, 40.0]
    arr = np.random.default_rng(1).normal(0, 100, shape).astype(np.float32)
    return Volume(arr, m)


def client(tmp_path, **kw) -> WorkerClient:
    return WorkerClient(pythonpath=[str(ROOT), str(TESTING)], work_root=tmp_path, task_runner=RUNNER, **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie counts as dead
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def test_request_and_result_files_round_trip_exactly(tmp_path):
    img = oblique()
    mask = Volume(img.array > 0, img.ijk_to_ras)
    lab = Volume(np.arange(img.array.size, dtype=np.int16).reshape(img.shape) % 3, np.eye(4))
    req = TaskRequest(image=img, region="chest", anatomy=lab, anatomy_names={1: "liver", 2: "spleen"},
                      mask=mask, params={"steps": 7, "strength": 0.5, "shape": (1, 2, 3)})
    worker.write_request(tmp_path, "inpaint", req, model="demo", controlnet="cn", device="cpu")
    task, back, opts = worker.read_request(tmp_path)
    assert task == "inpaint" and opts == {"model": "demo", "controlnet": "cn", "device": "cpu"}
    assert back.region == "chest" and back.anatomy_names == {1: "liver", 2: "spleen"}
    assert back.params == {"steps": 7, "strength": 0.5, "shape": [1, 2, 3]}
    for a, b in ((img, back.image), (mask, back.mask), (lab, back.anatomy)):
        assert b.array.dtype == a.array.dtype and np.array_equal(a.array, b.array)
        assert np.array_equal(a.ijk_to_ras, b.ijk_to_ras)
    res = TaskResult(volumes={"denoised": img}, segmentations={"anomaly": mask}, scores={"s": 1.5}, summary="ok")
    worker.write_result(tmp_path, res)
    assert (tmp_path / "out" / "result.json").is_file() and not (tmp_path / "out.tmp").exists()
    got = worker.read_result(tmp_path)
    assert np.array_equal(got.volumes["denoised"].array, img.array)
    assert np.array_equal(got.segmentations["anomaly"].ijk_to_ras, img.ijk_to_ras)
    assert got.scores == {"s": 1.5} and got.summary == "ok"


def test_parse_line():
    kind, p = worker.parse_line('MEDDIFFFM_PROGRESS {"step": 2, "total_steps": 5, "fraction": 0.4, "eta_s": 3}\n')
    assert kind == "progress" and isinstance(p, Progress) and p.step == 2 and p.eta_s == 3
    assert worker.parse_line("MEDDIFFFM_LOG hello world") == ("log", "hello world")
    assert worker.parse_line('MEDDIFFFM_ERROR {"kind": "failed", "message": "x"}')[0] == "error"
    assert worker.parse_line("Traceback (most recent call last):") == ("text", "Traceback (most recent call last):")
    assert worker.parse_line("MEDDIFFFM_PROGRESS {not json")[0] == "text"


def test_out_of_memory_detection():
    class OutOfMemoryError(RuntimeError):
        pass

    class OutOfMemory(RuntimeError):  # the library's, raised after its own retries
        pass

    assert server.is_out_of_memory(OutOfMemoryError("x")) and server.is_out_of_memory(OutOfMemory("y"))
    assert server.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not server.is_out_of_memory(ValueError("out of range"))
    assert not server.is_out_of_memory(RuntimeError("shape mismatch"))


def test_worker_runs_and_streams_progress(tmp_path):
    img = oblique()
    progress, logs = [], []
    c = client(tmp_path)
    c.start("denoise", TaskRequest(image=img, params={"steps": 3, "fake_sleep": 0.02}), model="tiny",
            device="cpu", on_progress=progress.append, on_log=logs.append)
    assert c.wait(timeout=60) == worker.EXIT_OK
    res = c.result()
    assert np.array_equal(res.volumes["denoised"].array, img.array + 1)
    assert np.array_equal(res.volumes["denoised"].ijk_to_ras, img.ijk_to_ras)
    assert res.segmentations["anomaly"].array.dtype == bool
    assert res.summary == "fake denoise done" and res.scores["anomaly_score"] == 0.5
    assert progress and all(isinstance(p, Progress) for p in progress)
    assert progress[-1].fraction == pytest.approx(1.0) and progress[-1].total_windows == 2
    assert any("model=tiny" in line and "device=cpu" in line for line in logs)
    assert not any(tmp_path.iterdir()), "request folder left behind"


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_killed_worker_leaves_no_output(tmp_path):
    c = client(tmp_path, keep_files=True)
    c.start("denoise", TaskRequest(image=oblique(), params={"steps": 200, "fake_sleep": 0.2}))
    deadline = time.monotonic() + 60
    while c.poll() and c.last_progress is None and time.monotonic() < deadline:
        time.sleep(0.05)
    request_dir = c.request_dir
    os.killpg(c.proc.pid, signal.SIGKILL)  # a crash, not a cancel
    rc = c.wait(timeout=30)
    assert rc == -signal.SIGKILL
    assert not (request_dir / "out").exists()
    with pytest.raises(WorkerError):
        c.result()
    c.cleanup()
    assert not request_dir.exists()


def run_in_process(tmp_path, capsys, params):
    """The worker's main() in this process (fast: no interpreter start); its exit code and lines."""
    worker.write_request(tmp_path, "denoise", TaskRequest(image=oblique(), params=params))
    rc = worker.main(["--request", str(tmp_path), "--task-runner", RUNNER])
    return rc, capsys.readouterr().out


def test_out_of_memory_is_reported_once_without_a_second_retry_loop(tmp_path, capsys, monkeypatch):
    """run_task owns the out-of-memory retry; the worker calls it once and reports the error."""
    import fake_task_runner

    calls = []
    real = fake_task_runner.run_task

    def counting(*a, **k):
        calls.append(a[1].params.get("batch_size"))
        return real(*a, **k)

    monkeypatch.setattr(fake_task_runner, "run_task", counting)
    rc, out = run_in_process(tmp_path, capsys, {"batch_size": 8, "fake_oom_above_batch": 2})
    assert rc == worker.EXIT_OUT_OF_MEMORY and calls == [8], out
    kind, err = worker.parse_line(next(line for line in out.splitlines() if line.startswith("MEDDIFFFM_ERROR")))
    assert err["kind"] == "out_of_memory" and "CPU" in err["message"] and "Tried to allocate" in err["message"]
    assert "retrying" not in out
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_library_out_of_memory_is_final(tmp_path, capsys, monkeypatch):
    """run_task already retried down to batch 1 and raised its OutOfMemory."""
    import fake_task_runner

    class OutOfMemory(RuntimeError):
        pass

    calls = []

    def runner(*a, **k):
        calls.append(1)
        raise OutOfMemory("the GPU ran out of memory even with one window at a time")

    monkeypatch.setattr(fake_task_runner, "run_task", runner)
    rc, out = run_in_process(tmp_path, capsys, {"batch_size": 8})
    assert rc == worker.EXIT_OUT_OF_MEMORY and len(calls) == 1 and "one window at a time" in out


def test_task_errors_are_reported_in_words(tmp_path, capsys):
    rc, out = run_in_process(tmp_path, capsys, {"fake_fail": "the mask is empty"})
    assert rc == worker.EXIT_FAILED and "the mask is empty" in out and not (tmp_path / "out").exists()
    rc, out = run_in_process(tmp_path, capsys, {"bogus": 1})  # unknown parameters are refused
    assert rc == worker.EXIT_FAILED and "bogus" in out


@pytest.mark.parametrize("rc, error, expected", [
    (worker.EXIT_OUT_OF_MEMORY, {"kind": "out_of_memory", "message": worker.OOM_MESSAGE}, WorkerOutOfMemory),
    (worker.EXIT_FAILED, {"kind": "failed", "message": "the mask is empty"}, WorkerError),
    (worker.EXIT_CANCELLED, {"kind": "cancelled", "message": "cancelled"}, Cancelled),
    (-9, None, WorkerError),
])
def test_client_maps_exit_codes_to_exceptions(tmp_path, rc, error, expected):
    """What the worker printed and its exit code -> the exception result() raises (no process)."""
    import types

    c = client(tmp_path)
    c.request_dir = tmp_path / "req"
    c.request_dir.mkdir()
    c.proc = types.SimpleNamespace(pid=0, stdin=None, stdout=None)
    c._queue.put(("text", "Traceback (most recent call last):"))
    if error is not None:
        c._queue.put(("error", error))
    c._queue.put(("exit", rc))
    with pytest.raises(expected) as info:
        c.result(timeout=5)
    if expected is WorkerOutOfMemory:
        assert info.value.returncode == rc and "CPU" in info.value.message
    if error is None:
        assert "Traceback" in str(info.value)
    assert not c.request_dir.exists()


def test_bad_request_exit_code(tmp_path, capsys):
    (tmp_path / "request.json").write_text("{not json", encoding="utf-8")
    assert worker.main(["--request", str(tmp_path)]) == worker.EXIT_BAD_REQUEST
    worker.write_request(tmp_path, "sharpen", TaskRequest(image=oblique()))
    assert worker.main(["--request", str(tmp_path), "--task-runner", RUNNER]) == worker.EXIT_BAD_REQUEST
    assert "unknown task 'sharpen'" in capsys.readouterr().out


def test_cancel_kills_the_process_tree_and_leaves_nothing(tmp_path):
    """Blocking API with a cancel flag; the worker and the process it started both die."""
    import threading

    ev = threading.Event()
    seen, logs = [], []

    def on_progress(p):
        seen.append(p)
        if any("child pid" in line for line in logs):
            ev.set()  # cancel once the grandchild is running

    with pytest.raises(Cancelled):
        runner = WorkerRunner(on_log=logs.append, pythonpath=[str(ROOT), str(TESTING)], work_root=tmp_path,
                              task_runner=RUNNER)
        runner("denoise", TaskRequest(image=oblique(), params={"steps": 200, "fake_sleep": 0.2,
                                                               "fake_spawn_child": True}),
               progress=on_progress, cancel=ev)
    assert seen
    pids = [int(re.search(r"(?:child pid|worker pid) (\d+)", line).group(1))
            for line in logs if re.search(r"(?:child pid|worker pid) \d+", line)]
    assert len(pids) == 2, logs
    for _ in range(100):
        if not any(alive(pid) for pid in pids):
            break
        time.sleep(0.05)
    assert not any(alive(pid) for pid in pids)
    assert not any(tmp_path.iterdir()), "request folder left behind"


def test_real_task_in_the_worker_with_a_tiny_model(tmp_path, tiny_model_dir):
    """No test hook: the worker runs MedDiffFMLib.tasks.run_task on the tiny model."""
    img = oblique((6, 10, 12))
    img.array[:] = np.clip(img.array, -200, 200)
    progress = []
    c = WorkerClient(pythonpath=[str(ROOT)], work_root=tmp_path)
    c.start("denoise", TaskRequest(image=img, region="chest", params={"steps": 1, "seed": 0}),
            model=tiny_model_dir, device="cpu", on_progress=progress.append)
    res = c.result(timeout=120)
    out = res.volumes["denoised"]
    assert out.array.shape == img.shape and np.array_equal(out.ijk_to_ras, img.ijk_to_ras)
    assert np.isfinite(out.array).all()
    assert progress and not any(tmp_path.iterdir())


def test_parent_watch():
    import subprocess

    assert server.process_alive(os.getpid())
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not server.process_alive(p.pid)


def test_environment_query_in_a_worker_interpreter(monkeypatch):
    """--info in a child interpreter; the child gets no console window on Windows."""
    info = worker.query_environment(pythonpath=[str(ROOT)], device="cpu", timeout=120)
    import torch

    assert info["torch"] == torch.__version__ and info["device"] == "cpu", info
    assert worker.popen_kwargs("nt")["creationflags"] & 0x08000000  # CREATE_NO_WINDOW
    assert worker.popen_kwargs("posix") == {"start_new_session": True}
    seen = {}

    def fake_run(cmd, **kwargs):
        seen.update(kwargs)
        return subprocess.CompletedProcess(cmd, 0, worker.INFO_PREFIX + ' {"torch": "2.3.0", "device": "cpu"}\n', "")

    import subprocess

    monkeypatch.setattr(worker_client, "popen_kwargs", lambda: {"creationflags": 0x08000000})
    monkeypatch.setattr(worker_client.subprocess, "run", fake_run)
    assert worker.query_environment(device="cpu")["torch"] == "2.3.0"
    assert seen["creationflags"] == 0x08000000 and seen["stdin"] is subprocess.DEVNULL
