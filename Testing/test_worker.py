"""The worker process and its client: real subprocesses, progress lines, cancel, OOM retry.

The worker runs the test double ``Testing/fake_task_runner.py`` through its ``--task-runner``
hook. TODO(lead): add a case without the hook once a tiny real model can be written in the
test (``model=<tiny model dir>``), so the real ``run_task`` is driven end to end.
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
from MedDiffFMLib.worker import WorkerClient, WorkerError, WorkerOutOfMemory

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
    assert task == "inpaint" and opts == {"model": "demo", "controlnet": "cn", "device": "cpu",
                                          "filter_params": False}
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
    kind, p = worker._parse_line('MEDDIFFFM_PROGRESS {"step": 2, "total_steps": 5, "fraction": 0.4, "eta_s": 3}\n')
    assert kind == "progress" and isinstance(p, Progress) and p.step == 2 and p.eta_s == 3
    assert worker._parse_line("MEDDIFFFM_LOG hello world") == ("log", "hello world")
    assert worker._parse_line('MEDDIFFFM_ERROR {"kind": "failed", "message": "x"}')[0] == "error"
    assert worker._parse_line("Traceback (most recent call last):") == ("text", "Traceback (most recent call last):")
    assert worker._parse_line("MEDDIFFFM_PROGRESS {not json")[0] == "text"


def test_out_of_memory_detection():
    class OutOfMemoryError(RuntimeError):
        pass

    assert worker.is_out_of_memory(OutOfMemoryError("x"))
    assert worker.is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert not worker.is_out_of_memory(ValueError("out of range"))
    assert not worker.is_out_of_memory(RuntimeError("shape mismatch"))


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


def test_cancel_kills_the_process_tree_and_leaves_nothing(tmp_path):
    c = client(tmp_path)
    logs = []
    c.start("denoise", TaskRequest(image=oblique(), params={"steps": 200, "fake_sleep": 0.2,
                                                             "fake_spawn_child": True}), on_log=logs.append)
    deadline = time.monotonic() + 60
    while c.poll() and c.last_progress is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.last_progress is not None, list(c.log_lines)
    child = int(next(re.search(r"child pid (\d+)", line).group(1) for line in logs if "child pid" in line))
    worker_pid = c.proc.pid
    assert alive(child)
    c.cancel()
    assert not c.running
    assert not alive(worker_pid)
    for _ in range(50):  # the grandchild is killed with its process group
        if not alive(child):
            break
        time.sleep(0.05)
    assert not alive(child)
    assert not any(tmp_path.iterdir()), "request folder left behind"
    with pytest.raises(Cancelled):
        c.result()


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


def test_out_of_memory_halves_batch_then_succeeds_and_params_are_filtered(tmp_path):
    logs = []
    c = client(tmp_path)
    c.start("denoise", TaskRequest(image=oblique(), params={"batch_size": 8, "fake_oom_above_batch": 2,
                                                             "not_a_denoise_param": 3}),
            filter_params=True, on_log=logs.append)
    res = c.result(timeout=60)
    assert "denoised" in res.volumes
    text = "\n".join(logs)
    assert "retrying with batch size 4" in text and "retrying with batch size 2" in text
    assert "batch_size=2" in text and "not_a_denoise_param" in text


def test_out_of_memory_at_batch_one_exits_with_its_own_code(tmp_path):
    c = client(tmp_path)
    c.start("denoise", TaskRequest(image=oblique(), params={"batch_size": 2, "fake_oom_above_batch": 0}))
    with pytest.raises(WorkerOutOfMemory) as info:
        c.result(timeout=60)
    assert info.value.returncode == worker.EXIT_OUT_OF_MEMORY
    assert "CPU" in info.value.message
    assert not any(tmp_path.iterdir())


def test_task_error_is_reported_in_words(tmp_path):
    c = client(tmp_path)
    c.start("denoise", TaskRequest(image=oblique(), params={"fake_fail": "the mask is empty"}))
    with pytest.raises(WorkerError, match="the mask is empty") as info:
        c.result(timeout=60)
    assert info.value.returncode == worker.EXIT_FAILED
    # without filtering, unknown parameters are refused by the task
    c = client(tmp_path)
    c.start("denoise", TaskRequest(image=oblique(), params={"bogus": 1}))
    with pytest.raises(WorkerError, match="bogus"):
        c.result(timeout=60)


def test_bad_request_exit_code(tmp_path):
    (tmp_path / "request.json").write_text("{not json")
    assert worker.main(["--request", str(tmp_path)]) == worker.EXIT_BAD_REQUEST


def test_run_in_worker_blocking_with_cancel_flag(tmp_path):
    import threading

    ev = threading.Event()
    seen = []

    def on_progress(p):
        seen.append(p)
        ev.set()  # cancel at the first progress report

    with pytest.raises(Cancelled):
        worker.run_in_worker("denoise", TaskRequest(image=oblique(), params={"steps": 200, "fake_sleep": 0.2}),
                             progress=on_progress, cancel=ev, pythonpath=[str(ROOT), str(TESTING)],
                             work_root=tmp_path, task_runner=RUNNER)
    assert seen and not any(tmp_path.iterdir())
