"""Running one case, atomically, and the per-case records and reports."""

from __future__ import annotations

import csv
import datetime
import json
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .manifest import Case

NOT_HU = frozenset({"anomaly_map"})  # output volumes that are not in HU (kept as float with --integer-hu)
REPORT_FIELDS = ("id", "status", "seconds", "rank", "finished", "outputs", "error")


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
    from .. import io
    from ..tasks import TaskRequest

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

    from .. import io
    from ..tasks.registry import TASKS
    from ..volume import Volume

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
    from ..tasks import run_task

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
