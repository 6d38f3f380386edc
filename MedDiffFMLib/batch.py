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

import argparse
import csv
import datetime
import json
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

COLUMNS = ("id", "image", "mask", "anatomy", "region")
NOT_HU = frozenset({"anomaly_map"})  # output volumes that are not in HU (kept as float with --integer-hu)
REPORT_FIELDS = ("id", "status", "seconds", "rank", "finished", "outputs", "error")
BARRIER_TIMEOUT = datetime.timedelta(days=7)  # the slowest shard of a large cohort may take days


@dataclass(frozen=True)
class Case:
    """One manifest row with paths resolved. ``id`` names the case's output folder."""

    id: str
    image: Optional[Path] = None
    mask: Optional[Path] = None
    anatomy: Optional[Path] = None
    region: Optional[str] = None


@dataclass
class CaseRecord:
    """What happened to one case (a line of the report)."""

    id: str
    status: str  # "ok", "failed" or "pending" (not run yet, e.g. another rank is still on it)
    seconds: Optional[float] = None
    rank: Optional[int] = None
    finished: Optional[str] = None  # UTC time, ISO 8601
    outputs: list[str] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None


# ------------------------------------------------------------------------------ manifest
def _case_id(text: str) -> str:
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if text.lower().endswith(ext):
            text = text[: -len(ext)]
            break
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "case"


def read_manifest(path: str | os.PathLike, needs_image: bool = True) -> list[Case]:
    """Cases of a CSV or JSON manifest, in file order.

    Raises:
        ValueError: one line naming the problem (unknown column, missing image, duplicate id),
            before any case runs. Missing files are not checked here: such a case fails alone.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {str(path)!r}")
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        rows = data.get("cases") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError(f"{path}: a JSON manifest is a list of objects or {{\"cases\": [...]}}")
    elif path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    else:
        raise ValueError(f"{path}: the manifest must be .csv, .tsv or .json")
    cases, seen = [], {}
    for n, row in enumerate(rows, start=1):
        unknown = sorted(set(row) - set(COLUMNS))
        if unknown:
            raise ValueError(f"{path}: row {n} has unknown column(s) {', '.join(map(str, unknown))}; "
                             f"known: {', '.join(COLUMNS)}")
        values = {k: (str(v).strip() if v is not None else "") for k, v in row.items()}
        given = {k: path.parent / v for k, v in values.items() if v and k in ("image", "mask", "anatomy")}
        if needs_image and "image" not in given:
            raise ValueError(f"{path}: row {n} has no image")
        if not given.get("image") and not given.get("anatomy"):
            raise ValueError(f"{path}: row {n} has neither an image nor an anatomy map")
        case_id = _case_id(values.get("id") or Path(values.get("image") or values["anatomy"]).name)
        if case_id in seen:
            raise ValueError(f"{path}: rows {seen[case_id]} and {n} have the same id {case_id!r}; "
                             "give each row a unique 'id'")
        seen[case_id] = n
        cases.append(Case(case_id, given.get("image"), given.get("mask"), given.get("anatomy"),
                          values.get("region") or None))
    if not cases:
        raise ValueError(f"{path}: the manifest has no cases")
    return cases


# ------------------------------------------------------------------------------ sharding
def rank_and_world(env: Optional[dict] = None) -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK / WORLD_SIZE or Slurm's SLURM_PROCID /
    SLURM_NTASKS; (0, 1) when neither is set."""
    env = os.environ if env is None else env
    for rank_key, world_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if world_key in env:
            rank, world = int(env.get(rank_key, 0)), int(env[world_key])
            if world < 1 or not 0 <= rank < world:
                raise ValueError(f"{rank_key}={rank} does not fit {world_key}={world}")
            return rank, world
    return 0, 1


def shard(cases: Sequence[Case], rank: int, world: int) -> list[Case]:
    """Every ``world``-th case from ``rank``: shards differ by at most one case, and neighbours
    in the manifest (often similar sizes) spread over the ranks."""
    return list(cases[rank::world])


def device_for_rank(device: str) -> str:
    """'auto' or 'cuda' under torchrun -> this process's GPU (LOCAL_RANK), when there are GPUs."""
    if device not in ("auto", "cuda", "gpu"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return f"cuda:{local % torch.cuda.device_count()}"


# ------------------------------------------------------------------------------ one case
def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def integer_hu(array):
    """HU rounded to the nearest integer as int16 (exact for integer-valued HU; the writer
    then stores 2 bytes a voxel instead of 4)."""
    import numpy as np

    return np.clip(np.rint(array), -32768, 32767).astype(np.int16)


def _request(case: Case, params: dict, region: Optional[str]):
    from . import io
    from .tasks import TaskRequest

    image = io.read_volume(case.image) if case.image else None
    anatomy = names = mask = None
    if case.anatomy:
        anatomy, names = io.read_labelmap(case.anatomy)
    if case.mask:
        mask, _ = io.read_labelmap(case.mask)
    return TaskRequest(image=image, region=case.region or region, anatomy=anatomy, anatomy_names=names,
                       mask=mask, params=dict(params))


def _write_case(result, task: str, case: Case, folder: Path, as_integer_hu: bool) -> list[str]:
    """The task's outputs as NIfTI in ``folder``: the primary volume as ``<id>_<task>.nii.gz``,
    every other output beside it as ``<id>_<task>_<name>.nii.gz`` (the CLI's naming)."""
    import numpy as np

    from . import io
    from .tasks.registry import TASKS
    from .volume import Volume

    primary = TASKS[task].primary_volume
    items = [(name, v, False) for name, v in result.volumes.items()]
    items += [(name, v, True) for name, v in result.segmentations.items()]
    written = []
    for name, vol, is_segmentation in items:
        stem = f"{case.id}_{task}" if (name == primary and not is_segmentation) else f"{case.id}_{task}_{name}"
        if is_segmentation:
            vol = Volume(np.asarray(vol.array).astype(np.uint8), vol.ijk_to_ras)
        elif as_integer_hu and name not in NOT_HU:
            vol = Volume(integer_hu(vol.array), vol.ijk_to_ras)
        io.write_volume(folder / f"{stem}.nii.gz", vol)
        written.append(f"{stem}.nii.gz")
    return written


def run_case(case: Case, task: str, params: dict, out: Path, *, model=None, controlnet=None, device="auto",
             region: Optional[str] = None, as_integer_hu: bool = False, rank: int = 0,
             runner: Optional[Callable] = None) -> CaseRecord:
    """Run one case and write it atomically to ``out/cases/<id>/``; failures are recorded in
    ``out/failed/<id>.json`` and returned, never raised (except KeyboardInterrupt)."""
    from .tasks import run_task

    runner = runner or run_task
    final = out / "cases" / case.id
    partial = out / ".partial" / f"{case.id}@{os.getpid()}"  # "@" never occurs in an id
    t0 = time.monotonic()
    try:
        request = _request(case, params, region)
        result = runner(task, request, model, controlnet=controlnet, device=device)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        outputs = _write_case(result, task, case, partial, as_integer_hu)
        record = CaseRecord(case.id, "ok", round(time.monotonic() - t0, 3), rank, _utc_now(), outputs,
                            {k: float(v) for k, v in result.scores.items()})
        _write_json_atomic(partial / "result.json", asdict(record))
        if final.exists():  # a stale copy (e.g. from another rank layout) is replaced whole
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, final)
        (out / "failed" / f"{case.id}.json").unlink(missing_ok=True)
        return record
    except KeyboardInterrupt:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    except Exception as e:  # noqa: BLE001 (one bad case must not stop a cohort)
        shutil.rmtree(partial, ignore_errors=True)
        record = CaseRecord(case.id, "failed", round(time.monotonic() - t0, 3), rank, _utc_now(),
                            error=f"{type(e).__name__}: {e}")
        _write_json_atomic(out / "failed" / f"{case.id}.json",
                           {**asdict(record), "traceback": traceback.format_exc(limit=20)})
        return record


# ------------------------------------------------------------------------------ reports
def case_record(out: Path, case: Case) -> CaseRecord:
    """The recorded outcome of a case: ok, failed, or pending when there is none."""
    for path in (out / "cases" / case.id / "result.json", out / "failed" / f"{case.id}.json"):
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            data.pop("traceback", None)
            return CaseRecord(**data)
    return CaseRecord(case.id, "pending")


def write_reports(out: Path, cases: Sequence[Case]) -> tuple[Path, Path]:
    """``report.jsonl`` and ``report.csv`` (one row per case, manifest order; score columns
    ``score_<name>``), both written atomically. Returns their paths."""
    records = [case_record(out, c) for c in cases]
    score_names = sorted({k for r in records for k in r.scores})
    jsonl, csv_path = out / "report.jsonl", out / "report.csv"
    tmp = jsonl.with_name(f".report.jsonl.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(asdict(r)) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, jsonl)
    tmp = csv_path.with_name(f".report.csv.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(list(REPORT_FIELDS) + [f"score_{s}" for s in score_names])
        for r in records:
            row = asdict(r)
            row["outputs"] = ";".join(r.outputs)
            writer.writerow([("" if row[k] is None else row[k]) for k in REPORT_FIELDS]
                            + [r.scores.get(s, "") for s in score_names])
    os.replace(tmp, csv_path)
    return jsonl, csv_path


class _EventLog:
    """Appends one JSON line per event to ``logs/rank<r>-of-<w>.jsonl`` (flushed at once)."""

    def __init__(self, out: Path, rank: int, world: int):
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.file = open(out / "logs" / f"rank{rank}-of-{world}.jsonl", "a", encoding="utf-8")
        self.rank = rank

    def __call__(self, event: str, case_id: str, **extra) -> None:
        self.file.write(json.dumps({"time": _utc_now(), "rank": self.rank, "event": event, "id": case_id,
                                    "pid": os.getpid(), **extra}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# ------------------------------------------------------------------------------ the run
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
    from .tasks.registry import check_params, task_spec

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


# ------------------------------------------------------------------------------ command line
def add_cli(sub) -> None:
    """Register ``meddiff-fm batch`` on the CLI's subparsers."""
    from .tasks.registry import TASKS

    p = sub.add_parser(
        "batch", help="run one task over a cohort (CSV / JSON manifest), sharded under torchrun or Slurm",
        description=__doc__.split("\n\n")[1].replace("``", ""), formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Task options (e.g. --steps, --seed, --backend) follow the task's own command: "
               "meddiff-fm batch MANIFEST --task denoise --out DIR --steps 2. Many GPUs: "
               "torchrun --nproc_per_node 8 -m MedDiffFMLib.cli batch ...")
    p.add_argument("manifest", help="CSV or JSON manifest: image, and optionally id, mask, anatomy, region")
    p.add_argument("--task", required=True, choices=tuple(TASKS), help="the task to run on every case")
    p.add_argument("--out", required=True, help="output folder (cases/, failed/, logs/, report.jsonl, report.csv)")
    p.add_argument("--region", default=None, help="region for rows without one (default: guessed per image)")
    p.add_argument("--model", default=None, help="foundation model directory or registry id")
    p.add_argument("--controlnet", default=None, help="ControlNet directory or registry id (superres, lesion, "
                                                      "inpaint; default: the registered one)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (under torchrun: this rank's GPU)")
    p.add_argument("--integer-hu", action="store_true", help="write HU images as int16, rounded to whole HU "
                                                             "(half the size; exact for integer HU)")
    p.add_argument("--no-retry-failed", dest="retry_failed", action="store_false",
                   help="keep the record of cases that failed before instead of running them again")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_all_task_options(p.add_argument_group("task options (each applies to the tasks that take it; "
                                               "defaults: the task's own)"))
    p.set_defaults(func=_cmd_batch)


def _add_all_task_options(group) -> None:
    """Every task's parameters as options, each once; unset ones keep the task's default."""
    from .tasks.registry import TASKS

    users: dict[str, list[str]] = {}
    for task in TASKS.values():
        for name in task.params:
            users.setdefault(name, []).append(task.name)
    for name, tasks in users.items():
        spec = TASKS[tasks[0]].params[name]
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        if spec.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=spec.type, choices=spec.choices, nargs=spec.length)
        scope = "every task" if len(tasks) == len(TASKS) else ", ".join(tasks)
        group.add_argument(flag, help=f"{spec.help} ({scope})", **kw)


def _cmd_batch(args) -> int:
    from .tasks.registry import TASKS

    all_names = {n for t in TASKS.values() for n in t.params}
    given = {n: getattr(args, n) for n in all_names if hasattr(args, n)}
    foreign = sorted(set(given) - set(TASKS[args.task].params))
    if foreign:
        raise ValueError(f"task {args.task!r} takes no option(s) "
                         f"{', '.join('--' + n.replace('_', '-') for n in foreign)}")
    params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in given.items()}
    try:
        summary = run_batch(args.manifest, args.task, params, args.out, model=args.model,
                            controlnet=args.controlnet, device=args.device, region=args.region,
                            as_integer_hu=args.integer_hu, retry_failed=args.retry_failed, progress=not args.quiet)
    except KeyboardInterrupt:
        print("\ninterrupted: finished cases are kept; run the same command again to resume", file=sys.stderr)
        return 130
    line = (f"batch rank {summary.rank}/{summary.world}: {summary.done} done, {summary.skipped} already done, "
            f"{summary.failed} failed")
    if summary.report:
        line += f"; report {summary.report[0]} and {summary.report[1].name}"
    print(line)
    return 1 if summary.failed else 0
