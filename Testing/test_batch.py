"""Cohort inference: manifests, sharding, atomic cases, resume, failures, reports, torchrun.

Real runs: the tiny random model, denoising small phantoms on the CPU. The torchrun test starts
two gloo ranks, kills them mid-cohort and runs the same command again.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from MedDiffFMLib import batch, cli, io
from MedDiffFMLib.phantoms import make_phantom

pytestmark = pytest.mark.usefixtures("single_thread")

TASK_ARGS = ["--steps", "2", "--method", "ddpm", "--device", "cpu", "--quiet"]


def _cohort(folder: Path, n: int, shape=(8, 24, 24), missing: bool = True) -> Path:
    """``n`` phantoms as NIfTI and a CSV manifest with relative paths (plus one missing file)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [["id", "image", "region"]]
    for s in range(n):
        ph = make_phantom("abdomen", shape_kji=shape, spacing_kji=(2.0, 1.0, 1.0), seed=s, noise_hu=15.0)
        io.write_volume(folder / f"ct{s}.nii.gz", ph.volume())
        rows.append([f"case{s}", f"ct{s}.nii.gz", "abdomen"])
    if missing:
        rows.append(["broken", "no_such_file.nii.gz", ""])
    manifest = folder / "cohort.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return manifest


def _events(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted((out / "logs").glob("*.jsonl"))
            for line in p.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------ manifest
def test_manifest_csv_and_json_resolve_paths_and_refuse_bad_rows(tmp_path):
    (tmp_path / "m.csv").write_text("image,mask,region\nsub/a.nii.gz,sub/a_mask.nii.gz,chest\nb.nrrd,,\n",
                                    encoding="utf-8")
    a, b = batch.read_manifest(tmp_path / "m.csv")
    assert (a.id, a.image, a.mask, a.region) == ("a", tmp_path / "sub/a.nii.gz", tmp_path / "sub/a_mask.nii.gz",
                                                  "chest")
    assert (b.id, b.mask, b.region) == ("b", None, None)
    (tmp_path / "m.json").write_text(json.dumps({"cases": [{"id": "x 1", "anatomy": "x.nii.gz"}]}), encoding="utf-8")
    (only,) = batch.read_manifest(tmp_path / "m.json", needs_image=False)
    assert only.id == "x_1" and only.image is None and only.anatomy == tmp_path / "x.nii.gz"
    with pytest.raises(ValueError, match="no image"):
        batch.read_manifest(tmp_path / "m.json", needs_image=True)
    bad = {"dup.csv": ("image\nd/a.nii.gz\ne/a.nii.gz\n", "same id 'a'"),
           "typo.csv": ("image,maks\na.nii.gz,m.nii.gz\n", "unknown column.*maks"),
           "empty.csv": ("image\n", "no cases")}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=message):
            batch.read_manifest(tmp_path / name)


def test_rank_from_torchrun_or_slurm_and_shards_cover_every_case_once():
    assert batch.rank_and_world({}) == (0, 1)
    assert batch.rank_and_world({"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_NTASKS": "9"}) == (3, 4)
    assert batch.rank_and_world({"SLURM_PROCID": "2", "SLURM_NTASKS": "5"}) == (2, 5)
    with pytest.raises(ValueError, match="does not fit"):
        batch.rank_and_world({"RANK": "2", "WORLD_SIZE": "2"})
    cases = [batch.Case(f"c{i}", Path(f"c{i}.nii")) for i in range(11)]
    for world in (1, 2, 3, 4, 16):
        shards = [batch.shard(cases, r, world) for r in range(world)]
        ids = [c.id for s in shards for c in s]
        assert sorted(ids) == sorted(c.id for c in cases) and len(ids) == len(set(ids))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


# ------------------------------------------------------------------------------ one process
def test_batch_writes_cases_records_failures_and_resumes(tmp_path, tiny_model_dir, capsys):
    manifest = _cohort(tmp_path / "data", 2)
    out = tmp_path / "out"
    argv = ["batch", str(manifest), "--task", "denoise", "--out", str(out), "--model", str(tiny_model_dir),
            "--integer-hu", *TASK_ARGS]
    assert cli.main(argv) == 1  # one case failed
    assert "2 done, 0 already done, 1 failed" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == ["case0", "case1", "broken"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert "no_such_file" in rows[2]["error"] and rows[0]["error"] is None
    assert rows[0]["seconds"] > 0 and "noise_level_hu" in rows[0]["scores"]
    with open(out / "report.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [r["status"] for r in table] == ["ok", "ok", "failed"]
    assert float(table[0]["score_noise_level_hu"]) == pytest.approx(rows[0]["scores"]["noise_level_hu"])
    # outputs: on the input's grid, integer HU
    source = io.read_volume(tmp_path / "data" / "ct0.nii.gz")
    written = io.read_volume(out / "cases" / "case0" / "case0_denoise.nii.gz")
    np.testing.assert_allclose(written.ijk_to_ras, source.ijk_to_ras, atol=1e-5)
    assert written.array.shape == source.array.shape
    import nibabel

    assert nibabel.load(out / "cases" / "case0" / "case0_denoise.nii.gz").get_data_dtype() == np.int16
    assert not (out / ".partial").exists() or not any((out / ".partial").iterdir())

    # rerun: finished cases are skipped (untouched), the failed one is tried again
    stamp = (out / "cases" / "case0" / "result.json").stat().st_mtime_ns
    (tmp_path / "data" / "no_such_file.nii.gz").write_bytes((tmp_path / "data" / "ct1.nii.gz").read_bytes())
    assert cli.main(argv) == 0
    assert "1 done, 2 already done, 0 failed" in capsys.readouterr().out
    assert (out / "cases" / "case0" / "result.json").stat().st_mtime_ns == stamp
    assert not (out / "failed" / "broken.json").exists()
    assert [json.loads(x)["status"] for x in (out / "report.jsonl").read_text(encoding="utf-8").splitlines()] == \
        ["ok"] * 3


def test_bad_task_options_fail_before_any_case(tmp_path, tiny_model_dir):
    manifest = _cohort(tmp_path / "data", 1, missing=False)
    out = tmp_path / "out"
    base = ["batch", str(manifest), "--task", "denoise", "--out", str(out), "--model", str(tiny_model_dir)]
    assert cli.main(base + ["--jump-length", "3"]) == 2  # an inpainting option
    assert cli.main(base + ["--steps", "0"]) == 2
    assert not (out / "cases").exists() or not any((out / "cases").iterdir())


# ------------------------------------------------------------------------------ torchrun
def _torchrun(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "MedDiffFMLib.cli", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    for pid in [proc.pid, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find torchrun's workers")
def test_two_gloo_ranks_share_the_cohort_and_a_killed_run_resumes(tmp_path, tiny_model_dir):
    n = 6
    manifest = _cohort(tmp_path / "data", n, shape=(12, 32, 32), missing=False)
    out = tmp_path / "out"
    args = ["batch", str(manifest), "--task", "denoise", "--out", str(out), "--model", str(tiny_model_dir),
            *TASK_ARGS]
    # first run: killed (every process of it) once each rank has finished a case and started the next
    proc = _torchrun(args, tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        started = [e for e in _events(out) if e["event"] == "started"] if (out / "logs").is_dir() else []
        if all(sum(e["rank"] == r for e in started) >= 2 for r in (0, 1)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the first run ended before it could be killed:\n" + proc.stdout.read()[-3000:]
    _kill_tree(proc)
    time.sleep(0.5)
    done_first = {p.parent.name for p in (out / "cases").glob("*/result.json")}
    assert 2 <= len(done_first) < n
    assert not (out / "report.jsonl").exists()
    first_pids = {e["pid"] for e in _events(out)}

    # second run: the same command finishes the rest; no case runs twice
    proc = _torchrun(args, tmp_path)
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-3000:]
    events = [e for e in _events(out) if e["pid"] not in first_pids]
    ran = [e["id"] for e in events if e["event"] == "ok"]
    skipped = [e["id"] for e in events if e["event"] == "skipped"]
    assert sorted(ran) == sorted(set(f"case{i}" for i in range(n)) - done_first)
    assert sorted(skipped) == sorted(done_first)
    assert {e["rank"] for e in events} == {0, 1}
    ranks = {e["id"]: e["rank"] for e in events}
    assert all(ranks[f"case{i}"] == i % 2 for i in range(n))  # every second case per rank
    rows = [json.loads(line) for line in (out / "report.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == [f"case{i}" for i in range(n)] and {r["status"] for r in rows} == {"ok"}
    assert not any((out / ".partial").glob("*")) if (out / ".partial").exists() else True
    for i in range(n):
        assert (out / "cases" / f"case{i}" / f"case{i}_denoise.nii.gz").is_file()
