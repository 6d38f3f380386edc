"""The module's run path on real MRML: nodes.process with the worker runner, the polled job whose
result files are read off the main thread, the logged console command, and the GPU-memory check.
The worker runs the test double ``Testing/fake_task_runner.py`` through its ``--task-runner`` hook.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from slicer_scene import all_node_ids, app, assert_untouched, ct, node_array, node_matrix  # noqa: F401

from MedDiffFMLib.tasks.base import Cancelled
from MedDiffFMLib.worker import WorkerRunner, client as worker_client
from MedDiffFMSlicer import nodes, run

TESTING = Path(__file__).resolve().parent
ROOT = TESTING.parent


def settings(tmp_path) -> run.WorkerSettings:
    import sys

    return run.WorkerSettings(python=sys.executable, pythonpath=(str(ROOT), str(TESTING)), env={},
                              work_root=str(tmp_path), task_runner="fake_task_runner:run_task")


def test_one_run_path_through_the_worker(app, ct, tmp_path):
    """nodes.process with the worker runner: the module's console path."""
    node, array, m, study = ct
    mtime = node.GetImageData().GetMTime()
    logs = []
    runner = WorkerRunner(on_log=logs.append, **settings(tmp_path).client_options())
    out = nodes.process(node, "denoise", runner=runner, params={"steps": 2}, device="cpu")
    assert set(out) == {"denoised", "anomaly_segmentation"}  # what the fake returns, whatever the task
    assert np.array_equal(node_array(out["denoised"]), array.astype(np.float32) + 1)
    assert np.array_equal(node_matrix(out["denoised"]), m)
    assert any("fake run: task=denoise" in line for line in logs)
    assert not any(tmp_path.iterdir()), "request folder left behind"
    assert_untouched(node, array, m, mtime)


def test_job_reads_results_off_the_main_thread(app, ct, tmp_path, monkeypatch):
    node, array, m, _ = ct
    reads = []
    real = worker_client.read_result

    def recording(directory):
        reads.append(threading.get_ident())
        return real(directory)

    monkeypatch.setattr(worker_client, "read_result", recording)
    progress = []
    job = run.start(settings(tmp_path), node, "anomaly", params={"steps": 2}, device="cpu",
                    on_progress=progress.append)
    deadline = time.monotonic() + 60
    while job.poll():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    out = job.finish()
    assert reads and reads[0] != threading.get_ident() == threading.main_thread().ident
    assert progress and progress[-1].fraction == pytest.approx(1.0)
    assert job.summary == "fake anomaly done" and "anomaly_segmentation" in out
    assert not any(tmp_path.iterdir())


def test_cancelled_job_adds_nothing(app, ct, tmp_path):
    node, array, m, _ = ct
    before = all_node_ids(app.scene)
    # fake_ parameters are not task parameters: the run is refused before any work
    with pytest.raises(ValueError, match="fake_sleep"):
        run.start(settings(tmp_path), node, "denoise", params={"fake_sleep": 0.2})
    job = run.start(settings(tmp_path), node, "denoise", params={"steps": 1000}, device="cpu")
    assert job.client.running
    job.cancel()  # while the worker starts or runs
    while job.poll():
        time.sleep(0.02)
    with pytest.raises(Cancelled):
        job.finish()
    assert all_node_ids(app.scene) == before and not any(tmp_path.iterdir())


def test_logged_console_command_repeats_the_run(app, ct):
    node, array, m, _ = ct
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Drawn")
    command = run.console_command(node, "inpaint", params={"steps": 3, "content": "healthy"}, region="chest",
                                  mask_segmentation=seg, mask_segment_id="Segment_1", model="demo", device="cuda")
    calls = []

    class Logic:
        def process(self, *args, **kwargs):
            calls.append((args, kwargs))

    fake = type("util", (), {"getModuleLogic": staticmethod(lambda name: Logic()),
                             "getNode": staticmethod(app.scene.GetNodeByID)})
    exec(command, {"slicer": type("slicer", (), {"util": fake})})
    (args, kwargs), = calls
    assert args == (node,) and kwargs == {"task": "inpaint", "region": "chest", "maskSegmentation": seg,
                                          "maskSegmentId": "Segment_1", "model": "demo", "device": "cuda",
                                          "steps": 3, "content": "healthy"}


# ---------------------------------------------------------------------------------------------
# GPU memory check


CONFIG = {"window": 64, "channels": [32, 64, 128]}
GPU = {"cuda": True, "gpu_free_gb": 8.0, "gpu_total_gb": 8.0}


def test_memory_estimate_grows_with_window_batch_and_precision():
    small = run.estimate_gpu_memory_gb([32, 64, 128], 64, 1, "bf16")
    assert run.estimate_gpu_memory_gb([32, 64, 128], 64, 4, "bf16") - run.CUDA_CONTEXT_GB == pytest.approx(
        4 * (small - run.CUDA_CONTEXT_GB))
    assert run.estimate_gpu_memory_gb([32, 64, 128], 128, 1, "bf16") > 7 * (small - run.CUDA_CONTEXT_GB)
    assert run.estimate_gpu_memory_gb([32, 64, 128], 64, 1, "fp32") > small


def test_memory_check_advises_batch_then_window_then_cpu():
    fits = run.check_gpu_memory(GPU, CONFIG, window=0, batch_size=1, precision="bf16")
    assert fits.fits and fits.advice == "" and fits.estimate_gb < 8
    big = run.check_gpu_memory(GPU, CONFIG, window=160, batch_size=8, precision="fp32")
    assert not big.fits and big.batch_size < 8 and "batch size" in big.advice
    assert run.estimate_gpu_memory_gb(CONFIG["channels"], 160, big.batch_size, "fp32") <= 0.9 * 8
    huge = run.check_gpu_memory(GPU, CONFIG, window=400, batch_size=2, precision="fp32")
    assert huge.batch_size == 1 and 8 <= huge.window < 400 and "window size" in huge.advice
    tiny_gpu = dict(GPU, gpu_free_gb=0.3)  # less than the CUDA context: only the CPU is left
    cpu = run.check_gpu_memory(tiny_gpu, CONFIG, window=64, batch_size=1)
    assert cpu.use_cpu and "CPU" in cpu.advice and not big.use_cpu and not huge.use_cpu
    assert run.check_gpu_memory({"cuda": False}, CONFIG, window=400, batch_size=64).fits  # CPU run
    assert run.check_gpu_memory(GPU, CONFIG, window=400, batch_size=64, device="cpu").fits


def test_memory_check_reads_the_model_and_the_task_defaults():
    check = run.check_run_memory(GPU, "denoise", {}, model="meddifffm-demo-base")
    assert check.fits and check.window == 0 and check.batch_size == 4  # registry default batch
    assert run.check_run_memory(dict(GPU, gpu_free_gb=0.2), "denoise", {"batch_size": 2}).advice
