"""Training under DDP (gloo): ranks stay identical, and every rank leaves the process group."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from training_helpers import small_trainer, state_hash  # noqa: E402


def test_close_leaves_a_process_group_the_caller_made(tmp_path, monkeypatch):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun, but the group exists before training
        trainer = small_trainer(tmp_path / "run", 1)
        assert not trainer.dist.owns_group
        trainer.train()
        trainer.dist = dataclasses.replace(trainer.dist, world=2)  # what a rank of two sees
        trainer.close()
        assert dist.is_initialized()  # the caller's group is the caller's to close
    finally:
        dist.destroy_process_group()


def test_two_process_torchrun_keeps_ranks_identical(tmp_path):
    pytest.importorskip("MedDiffFMLib.phantoms")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(HERE / "ddp_train_worker.py"), str(tmp_path / "hashes"),
           "train", "--preset", "tiny", "--phantoms", "2", "--phantom-family", "miniature", "--phantom-fov", "64", "80", "80",
           "--spacing-range", "4", "8",
           "--steps", "3", "--batch-size", "1", "--lr", "1e-3", "--out", str(out), "--device", "cpu",
           "--no-progress", "--checkpoint-every", "100"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "hashes" / f"rank{r}.json").read_text(encoding="utf-8")) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world"] == 2 and r["steps"] == 3 for r in ranks)
    # every rank left the process group before exiting (one left alive can abort its peer at exit)
    assert all(r["left_group"] for r in ranks)
    # each rank drew its own data ...
    assert ranks[0]["losses"] != ranks[1]["losses"]
    # ... and the gradient all-reduce kept the weights identical
    assert ranks[0]["raw_sha256"] == ranks[1]["raw_sha256"]
    assert ranks[0]["ema_sha256"] == ranks[1]["ema_sha256"]
    assert ranks[0]["raw_sha256"] != ranks[0]["init_sha256"]
    # rank 0 wrote the (EMA) model; the checkpoint records both ranks' random states
    assert state_hash(load_file(str(out / "model" / "model.safetensors"))) == ranks[0]["ema_sha256"]
    state = load_file(str(out / "training_state" / "state.safetensors"))
    assert {"rng.0", "rng.1"} <= set(state)
    assert json.loads((out / "training_state" / "state.json").read_text(encoding="utf-8"))["world"] == 2
