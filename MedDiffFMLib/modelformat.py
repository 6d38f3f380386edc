"""The two files of a model directory, checked before anything is built from them.

* ``config.json``: every key and its type against :data:`BASE_SCHEMA` (a foundation model)
  or :data:`CONTROLNET_SCHEMA` (a task ControlNet, whose ``base`` is a foundation config).
  Messages name the file and the key. Unknown keys are refused (a newer writer, or a typo).
* ``model.safetensors``: the header and the byte layout. Every tensor's ``data_offsets`` must
  match its dtype and shape, the tensors must tile the data area exactly and the file must
  end where the last one does, so a truncated or padded file is refused before loading.

Standard library only (the Slicer module verifies imports before torch is installed).
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

FORMAT = "meddiff-fm/1"
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# bytes per element of each safetensors dtype
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class ModelFormatError(ValueError):
    """A config.json or model.safetensors that does not follow the format, in words."""


# ------------------------------------------------------------------------------- value checks
def _integer(minimum: int) -> Callable[[Any], Optional[str]]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return f"must be a whole number, got {v!r}"
        if v < minimum:
            return f"must be >= {minimum}, got {v!r}"
        return None
    return check


def _positive_number(v) -> Optional[str]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return f"must be a finite number, got {v!r}"
    if v <= 0:
        return f"must be > 0, got {v!r}"
    return None


def _spacing_range(v) -> Optional[str]:
    ok = (isinstance(v, list) and len(v) == 2 and all(_positive_number(x) is None for x in v) and v[0] <= v[1])
    return None if ok else f"must be [min, max] voxel sizes in mm with 0 < min <= max, got {v!r}"


def _text(v) -> Optional[str]:
    return None if isinstance(v, str) else f"must be text, got {v!r}"


def _nonempty_text(v) -> Optional[str]:
    return None if isinstance(v, str) and v.strip() else f"must be non-empty text, got {v!r}"


def _list_of(item: Callable[[Any], Optional[str]], what: str) -> Callable[[Any], Optional[str]]:
    def check(v):
        if not isinstance(v, list) or not v:
            return f"must be a non-empty list of {what}, got {v!r}"
        for x in v:
            if item(x) is not None:
                return f"must be a non-empty list of {what}, got {v!r}"
        return None
    return check


def _boolean(v) -> Optional[str]:
    return None if isinstance(v, bool) else f"must be true or false, got {v!r}"


def _mapping(v) -> Optional[str]:
    return None if isinstance(v, dict) else f"must be a JSON object, got {v!r}"


def _sha256(v) -> Optional[str]:
    return None if isinstance(v, str) and _SHA256.match(v) else f"must be 64 lower-case hex digits, got {v!r}"


def _controlnet_task(v) -> Optional[str]:
    from .tasks.registry import TASKS

    known = sorted({t.controlnet for t in TASKS.values() if t.controlnet})
    return None if v in known else f"must be one of {', '.join(known)}, got {v!r}"


# key -> (required, check). The foundation network's own keys (networks.ModelConfig fields;
# a test keeps the two lists equal).
BASE_SCHEMA: dict[str, tuple[bool, Callable[[Any], Optional[str]]]] = {
    "name": (False, _text),
    "window": (True, _integer(1)),
    "spacing_range_mm": (True, _spacing_range),
    "channels": (True, _list_of(_integer(1), "positive whole numbers")),
    "attention_levels": (True, _list_of(_boolean, "true/false")),
    "num_res_blocks": (True, _integer(1)),
    "num_head_channels": (True, _integer(1)),
    "norm_num_groups": (True, _integer(1)),
    "coord_frequencies": (True, _integer(0)),
    "num_regions": (True, _integer(1)),
    "anatomy_channels": (True, _integer(0)),
    "num_train_timesteps": (True, _integer(1)),
    "schedule": (True, _nonempty_text),
}
# Keys of the file around a config (both kinds).
_FILE_SCHEMA = {
    "format": (True, lambda v: None if v == FORMAT else f"must be {FORMAT!r} (unsupported format {v!r})"),
    "meta": (False, _mapping),
    "id": (False, _text),
    "version": (False, _text),
    "description": (False, _text),
}
CONTROLNET_SCHEMA = {
    "task": (True, _controlnet_task),
    "control_channels": (True, _integer(1)),
    "base": (True, _mapping),
    "base_sha256": (True, _sha256),
    "params": (False, _mapping),
}
# Keys that are not part of the network config (stripped before ModelConfig.from_dict).
FILE_KEYS = ("kind",) + tuple(_FILE_SCHEMA)


def _check_keys(cfg: Mapping, schema: Mapping, where: str, prefix: str = "") -> None:
    for key, (required, check) in schema.items():
        if key not in cfg:
            if required:
                raise ModelFormatError(f"{where}: key {prefix + key!r} is missing")
            continue
        problem = check(cfg[key])
        if problem is not None:
            raise ModelFormatError(f"{where}: key {prefix + key!r} {problem}")


def _refuse_unknown(cfg: Mapping, known, where: str, prefix: str = "") -> None:
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ModelFormatError(f"{where}: unknown key(s) {', '.join(prefix + k for k in unknown)} "
                               "(written by a newer MedDiffFM, or a typo?)")


def check_config(cfg: Any, where: str | Path) -> dict:
    """Check a parsed ``config.json``; returns it. ``where`` names the file in messages.

    Raises:
        ModelFormatError: the first problem, naming the file and the key.
    """
    where = str(where)
    if not isinstance(cfg, dict):
        raise ModelFormatError(f"{where} must hold a JSON object, got {type(cfg).__name__}")
    kind = cfg.get("kind")
    if kind not in ("base", "controlnet"):
        raise ModelFormatError(f"{where}: key 'kind' must be 'base' or 'controlnet', got {kind!r}")
    _check_keys(cfg, _FILE_SCHEMA, where)
    for body, prefix in ((cfg, ""), (cfg.get("base"), "base.")):
        if isinstance(body, dict) and "spacing_mm" in body and "spacing_range_mm" not in body:
            raise ModelFormatError(
                f"{where}: key {prefix}spacing_mm says this is a fixed-grid (v1, {body['spacing_mm']} mm) model; since "
                "v2 the model is conditioned on voxel size and runs at the input's own resolution: use the bundled "
                "'meddifffm-demo-base' or retrain with 'meddiff-fm train'")
    if kind == "base":
        _refuse_unknown(cfg, set(BASE_SCHEMA) | set(FILE_KEYS), where)
        _check_keys(cfg, BASE_SCHEMA, where)
        _check_levels(cfg, where, "")
    else:
        _refuse_unknown(cfg, set(CONTROLNET_SCHEMA) | set(FILE_KEYS), where)
        _check_keys(cfg, CONTROLNET_SCHEMA, where)
        _refuse_unknown(cfg["base"], BASE_SCHEMA, where, "base.")
        _check_keys(cfg["base"], BASE_SCHEMA, where, "base.")
        _check_levels(cfg["base"], where, "base.")
    return cfg


def _check_levels(cfg: Mapping, where: str, prefix: str) -> None:
    if len(cfg["channels"]) != len(cfg["attention_levels"]):
        raise ModelFormatError(f"{where}: keys {prefix}channels and {prefix}attention_levels must have the same "
                               f"length, got {len(cfg['channels'])} and {len(cfg['attention_levels'])}")


def read_config_file(path: Path) -> dict:
    """Parse and check a ``config.json``."""
    try:
        cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path} is not valid JSON: {e}") from e
    return check_config(cfg, path)


# ------------------------------------------------------------------------------- safetensors
def check_safetensors(path: Path) -> dict:
    """Check the header and byte layout of a safetensors file; returns the header.

    Raises:
        ModelFormatError: too short, bad header, a tensor whose byte range does not match its
            dtype and shape, gaps or overlaps, or a file shorter or longer than its tensors
            (truncated or padded).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelFormatError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise ModelFormatError(f"{path} is not a safetensors file (bad header length; truncated?)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelFormatError(f"{path} is not a safetensors file (header is not JSON)") from e
    if not isinstance(header, dict):
        raise ModelFormatError(f"{path} is not a safetensors file (header is not an object)")
    ranges = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            count = math.prod(int(s) for s in shape)
            ok = dtype in _DTYPE_BYTES and all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ModelFormatError(f"{path}: tensor {name!r} has a malformed header entry")
        if end - begin != count * _DTYPE_BYTES[dtype]:
            raise ModelFormatError(f"{path}: tensor {name!r} takes {end - begin} bytes but {dtype} {list(shape)} "
                                   f"needs {count * _DTYPE_BYTES[dtype]}")
        ranges.append((begin, end, name))
    ranges.sort()
    at = 0
    for begin, end, name in ranges:
        if begin != at:
            raise ModelFormatError(f"{path}: tensor {name!r} does not follow the previous one (byte {begin}, "
                                   f"expected {at}); the file is damaged")
        at = end
    data = size - 8 - n
    if data != at:
        state = "truncated" if data < at else "longer than its tensors"
        raise ModelFormatError(f"{path} is {state}: its tensors need {at} bytes of data, the file has {data}; "
                               "copy or download it again")
    return header
