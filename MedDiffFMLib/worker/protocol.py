"""What the worker and its client agree on: request and result folders, stdout lines, exit codes.

A request folder ``DIR`` holds:

* ``DIR/request.json``: the task, its parameters, region, model, ControlNet, device and the
  anatomy class names;
* ``DIR/image.npz``, ``DIR/anatomy.npz``, ``DIR/mask.npz``: the inputs, each ``array`` in
  (k, j, i) order and its 4x4 ``ijk_to_ras`` (exact: no resampling, no orientation
  conventions to get wrong).

The worker writes its outputs to ``DIR/out.tmp/`` and renames that to ``DIR/out/`` only on
success, so a killed or failed worker leaves no output behind; ``DIR/out/result.json`` lists
the files.

stdout carries machine-readable lines, one JSON object each::

    MEDDIFFFM_PROGRESS {"step": 3, "total_steps": 20, "window": 5, "total_windows": 8,
                        "stage": "sampling", "fraction": 0.17, "eta_s": 41.0}
    MEDDIFFFM_LOG <free text>
    MEDDIFFFM_ERROR {"kind": "out_of_memory" | "cancelled" | "bad_request" | "failed", "message": "..."}
    MEDDIFFFM_DONE {"summary": "...", "elapsed_s": 12.3}
    MEDDIFFFM_INFO {"torch": "2.3.0", "device": "cuda:0", ...}      (``--info`` only)

Any other line (a traceback, a library's print) is plain log text.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..tasks.base import Progress, TaskRequest, TaskResult
from ..volume import Volume

PROTOCOL_VERSION = 2  # 2: no filter_params; the worker no longer retries out-of-memory errors

PROGRESS_PREFIX = "MEDDIFFFM_PROGRESS"
LOG_PREFIX = "MEDDIFFFM_LOG"
ERROR_PREFIX = "MEDDIFFFM_ERROR"
DONE_PREFIX = "MEDDIFFFM_DONE"
INFO_PREFIX = "MEDDIFFFM_INFO"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_REQUEST = 2
EXIT_OUT_OF_MEMORY = 3
EXIT_CANCELLED = 4

REQUEST_NAME = "request.json"
RESULT_NAME = "result.json"
OUT_NAME = "out"
OUT_TMP_NAME = "out.tmp"
CANCEL_NAME = "cancel"
INPUT_FILES = {"image": "image.npz", "anatomy": "anatomy.npz", "mask": "mask.npz"}

OOM_MESSAGE = (
    "The GPU ran out of memory even with one window at a time. Choose the CPU as device (slower, but it "
    "has the memory), use a smaller window size, or close other programs that use the GPU.")

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


class WorkerError(RuntimeError):
    """The worker failed; ``kind`` and ``returncode`` say how, ``message`` says why in words."""

    def __init__(self, message: str, kind: str = "failed", returncode: Optional[int] = None, log: str = ""):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.returncode = returncode
        self.log = log


class WorkerOutOfMemory(WorkerError):
    """The GPU ran out of memory (the library already retried down to one window per batch)."""


# ---------------------------------------------------------------------------------------------
# Files


def save_volume(path: Path, volume: Volume) -> None:
    np.savez(path, array=np.ascontiguousarray(volume.array), ijk_to_ras=np.asarray(volume.ijk_to_ras, np.float64))


def load_volume(path: Path) -> Volume:
    with np.load(path, allow_pickle=False) as z:
        return Volume(z["array"], z["ijk_to_ras"])


def jsonable(value: Any) -> Any:
    """numpy scalars and arrays, tuples and paths -> plain JSON values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_request(directory: os.PathLike | str, task: str, request: TaskRequest, *,
                  model: Optional[os.PathLike | str] = None, controlnet: Optional[os.PathLike | str] = None,
                  device: str = "auto") -> Path:
    """Write a request folder for the worker (parameters are checked by the task, not here)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for key, fname in INPUT_FILES.items():
        vol = getattr(request, key)
        if vol is not None:
            save_volume(d / fname, vol)
            inputs[key] = fname
    payload = {
        "protocol": PROTOCOL_VERSION,
        "task": task,
        "params": jsonable(dict(request.params or {})),
        "region": request.region,
        "anatomy_names": None if request.anatomy_names is None
        else {str(int(k)): str(v) for k, v in request.anatomy_names.items()},
        "model": None if model is None else os.fspath(model),
        "controlnet": None if controlnet is None else os.fspath(controlnet),
        "device": device or "auto",
        "inputs": inputs,
    }
    tmp = d / (REQUEST_NAME + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    os.replace(tmp, d / REQUEST_NAME)
    return d


def read_request(directory: os.PathLike | str) -> tuple[str, TaskRequest, dict]:
    """(task, request, options) from a request folder; ValueError when it is malformed."""
    d = Path(directory)
    try:
        payload = json.loads((d / REQUEST_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ValueError(f"{d / REQUEST_NAME} does not exist") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{d / REQUEST_NAME} is not valid JSON: {e}") from e
    if not isinstance(payload, dict) or payload.get("protocol") != PROTOCOL_VERSION:
        found = payload.get("protocol") if isinstance(payload, dict) else None
        raise ValueError(f"{d / REQUEST_NAME}: unsupported request (protocol {found!r}, "
                         f"this worker speaks {PROTOCOL_VERSION})")
    task = payload.get("task")
    if not isinstance(task, str):
        raise ValueError("request.json: 'task' is missing")
    vols = {}
    for key, fname in (payload.get("inputs") or {}).items():
        if key not in INPUT_FILES or fname != INPUT_FILES[key]:
            raise ValueError(f"request.json: unexpected input {key!r}: {fname!r}")
        vols[key] = load_volume(d / fname)
    names = payload.get("anatomy_names")
    request = TaskRequest(
        image=vols.get("image"), region=payload.get("region"), anatomy=vols.get("anatomy"),
        anatomy_names=None if names is None else {int(k): v for k, v in names.items()},
        mask=vols.get("mask"), params=dict(payload.get("params") or {}))
    options = {k: payload.get(k) for k in ("model", "controlnet", "device")}
    return task, request, options


def write_result(directory: os.PathLike | str, result: TaskResult, extra: Optional[dict] = None) -> Path:
    """Write outputs to ``out.tmp/`` and rename it to ``out/`` (atomic on one file system)."""
    d = Path(directory)
    tmp, out = d / OUT_TMP_NAME, d / OUT_NAME
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "volumes": {}, "segmentations": {}}
    for group in ("volumes", "segmentations"):
        items = getattr(result, group) or {}
        if items:
            (tmp / group).mkdir()
        for name, vol in items.items():
            if not _NAME.match(name):
                raise ValueError(f"output name {name!r} is not a simple identifier")
            rel = f"{group}/{name}.npz"
            save_volume(tmp / rel, vol)
            manifest[group][name] = rel
    manifest["scores"] = {k: float(v) for k, v in (result.scores or {}).items()}
    manifest["summary"] = result.summary or ""
    manifest["messages"] = [str(m) for m in (result.messages or [])]
    manifest.update(extra or {})
    (tmp / RESULT_NAME).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_result(directory: os.PathLike | str) -> TaskResult:
    """Load ``DIR/out/`` (or an ``out`` folder itself) into a TaskResult. Plain numpy and file
    reads, so it may run on a background thread."""
    d = Path(directory)
    out = d if (d / RESULT_NAME).is_file() else d / OUT_NAME
    manifest = json.loads((out / RESULT_NAME).read_text(encoding="utf-8"))
    return TaskResult(
        volumes={k: load_volume(out / v) for k, v in manifest.get("volumes", {}).items()},
        segmentations={k: load_volume(out / v) for k, v in manifest.get("segmentations", {}).items()},
        scores=dict(manifest.get("scores", {})),
        summary=manifest.get("summary", ""),
        messages=list(manifest.get("messages", [])))


# ---------------------------------------------------------------------------------------------
# stdout lines


def format_line(prefix: str, payload: Any = None, text: Optional[str] = None) -> str:
    """One protocol line (without the newline); newlines inside are flattened."""
    return (prefix + " " + (text if text is not None else json.dumps(jsonable(payload)))).replace("\n", " ")


def parse_line(line: str) -> tuple[str, Any]:
    """One stdout line -> (kind, payload): progress / log / error / done / info / text."""
    line = line.rstrip("\r\n")
    prefix, _, rest = line.partition(" ")
    if prefix == LOG_PREFIX:
        return "log", rest
    if prefix in (PROGRESS_PREFIX, ERROR_PREFIX, DONE_PREFIX, INFO_PREFIX):
        try:
            payload = json.loads(rest)
        except json.JSONDecodeError:
            return "text", line
        if prefix == PROGRESS_PREFIX:
            fields = {f.name for f in dataclasses.fields(Progress)}
            kwargs = {k: v for k, v in payload.items() if k in fields}
            kwargs.setdefault("step", 0)
            kwargs.setdefault("total_steps", 0)
            return "progress", Progress(**kwargs)
        return {ERROR_PREFIX: "error", DONE_PREFIX: "done", INFO_PREFIX: "info"}[prefix], payload
    return "text", line
