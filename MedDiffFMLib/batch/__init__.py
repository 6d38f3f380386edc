"""Cohort inference: one task over a manifest of cases, sharded across processes and machines.

``meddiff-fm batch MANIFEST --task T --out DIR [task options]`` runs ``run_task`` on every case
of a CSV or JSON manifest. Under ``torchrun`` (RANK / WORLD_SIZE) or Slurm (SLURM_PROCID /
SLURM_NTASKS) each process takes every WORLD_SIZE-th case, so nodes and GPUs split a cohort
without talking to each other while they work.

Layout of ``DIR``::

    cases/<id>/<id>_<task>.nii.gz ...   outputs of a finished case, and its result.json
    failed/<id>.json                    the error of a failed case (retried on the next run)
    logs/rank<r>-of-<w>.jsonl           what each process did, one event per line
    report.jsonl, report.csv            one row per manifest case: status, time, scores, error

A case is written into a temporary folder that is renamed into ``cases/`` only when all its
files are complete, so a killed run leaves no half-written case, and a rerun skips every case
that has its folder. A failed case is recorded and the run goes on with the next one.

Manifest columns (CSV header or JSON object keys): ``image`` (required unless the task makes
images from anatomy alone), and optionally ``id``, ``mask``, ``anatomy``, ``region``. Relative
paths are read from the manifest's folder. JSON: a list of objects, or ``{"cases": [...]}``.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .cases import CaseRecord, _EventLog, case_record, integer_hu, run_case, write_reports
from .cli import add_cli
from .manifest import Case, device_for_rank, rank_and_world, read_manifest, shard

__all__ = ["run_batch", "BatchSummary", "Case", "CaseRecord", "read_manifest", "rank_and_world", "shard",
           "device_for_rank", "run_case", "case_record", "write_reports", "integer_hu", "add_cli"]

BARRIER_TIMEOUT = datetime.timedelta(days=7)  # the slowest shard of a large cohort may take days


@dataclass
class BatchSummary:
    rank: int
    world: int
    done: int  # cases run to completion by this process
    skipped: int  # already finished before this run
    failed: int
    report: Optional[tuple[Path, Path]]  # written by this process (rank 0, or every rank without a process group)


def _process_group(world: int):
    """A gloo process group for the final barrier when the launcher gave a rendezvous (torchrun,
    or Slurm with MASTER_ADDR / MASTER_PORT set); None otherwise."""
    if world <= 1 or "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        rank, world = rank_and_world()
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
    return dist


def run_batch(manifest: str | os.PathLike, task: str, params: dict, out: str | os.PathLike, *, model=None,
              controlnet=None, device: str = "auto", region: Optional[str] = None, as_integer_hu: bool = False,
              retry_failed: bool = True, progress: bool = True, runner: Optional[Callable] = None) -> BatchSummary:
    """Run ``task`` on this process's shard of ``manifest``, skipping finished cases.

    Args:
        params: task parameters (checked once, before any case runs).
        out: the output folder (created).
        region: region for rows that give none (None: each task's default, usually a guess).
        as_integer_hu: write HU volumes as int16 (rounded to whole HU).
        retry_failed: run cases that failed before again (default); else keep their record.
        runner: ``run_task`` or a stand-in with its signature.
    """
    from ..tasks.registry import check_params, task_spec

    spec = task_spec(task)
    check_params(task, params)  # unknown names and out-of-range values fail before any work
    cases = read_manifest(manifest, needs_image=spec.needs_image)
    if spec.needs_mask and any(c.mask is None for c in cases):
        missing = [c.id for c in cases if c.mask is None]
        raise ValueError(f"task {task!r} needs a mask for every case; {len(missing)} have none, e.g. {missing[0]!r}")
    rank, world = rank_and_world()
    group = _process_group(world)
    out = Path(out)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    mine = shard(cases, rank, world)
    for case in mine:  # leftovers of a killed run (only this rank writes this case's partial folder)
        for stale in (out / ".partial").glob(f"{case.id}@*"):
            shutil.rmtree(stale, ignore_errors=True)
    todo = [c for c in mine if not (out / "cases" / c.id / "result.json").is_file()
            and (retry_failed or not (out / "failed" / f"{c.id}.json").is_file())]
    log = _EventLog(out, rank, world)
    for case in mine:
        if case not in todo:
            log("skipped", case.id)
    device = device_for_rank(device)
    bar = _bar(len(mine), len(mine) - len(todo), rank, world) if progress else None
    done = failed = 0
    try:
        for case in todo:
            log("started", case.id)
            record = run_case(case, task, params, out, model=model, controlnet=controlnet, device=device,
                              region=region, as_integer_hu=as_integer_hu, rank=rank, runner=runner)
            log(record.status, case.id, seconds=record.seconds, error=record.error)
            done += record.status == "ok"
            failed += record.status == "failed"
            if bar is not None:
                bar.update(1)
                bar.set_postfix(ok=done, failed=failed, refresh=False)
    finally:
        log.close()
        if bar is not None:
            bar.close()
    report = None
    if group is not None:
        group.barrier()
        if rank == 0:
            report = write_reports(out, cases)
        group.barrier()
        group.destroy_process_group()
    else:  # no process group: every rank writes the report; the last to finish sees every case
        report = write_reports(out, cases)
    return BatchSummary(rank, world, done, len(mine) - len(todo), failed, report)


def _bar(total: int, initial: int, rank: int, world: int):
    from tqdm.auto import tqdm

    desc = f"rank {rank}/{world}" if world > 1 else "cases"
    return tqdm(total=total, initial=initial, desc=desc, unit="case", position=rank if world > 1 else None,
                dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
