"""Model weights: the registry, the local cache, offline import and verification.

A *model* is a directory holding ``config.json`` and ``model.safetensors`` (never a pickle).
Models come from two places:

* **bundled** with the extension under ``Resources/<path>`` (small demo weights), and
* the **cache**, ``~/.meddifffm/models/<id>/`` (override with the ``MEDDIFFFM_MODELS_DIR``
  environment variable; the Slicer module passes its "models directory" setting through it).

``Resources/models.json`` is the registry: one entry per released model with its SHA-256, so an
imported archive is checked before it is used. Models that are not in the registry can still be
imported and used by their directory name (they are reported as "custom").

Registry format::

    {
      "format_version": 1,
      "default": "meddifffm-ct-base-v1",          # optional; else the first base entry
      "models": [
        {"id": "meddifffm-ct-base-v1", "version": "1.0.0", "kind": "base",
         "path": "models/meddifffm-ct-base-v1",     # bundled: relative to Resources/
         "sha256": "<64 hex of model.safetensors>", "size": 123456789,
         "min_gpu_memory_gb": 8, "description": "..."},
        {"id": "meddifffm-ct-lesion-v1", "version": "1.0.0", "kind": "controlnet",
         "task": "lesion", "base": "meddifffm-ct-base-v1",
         "file": "meddifffm-ct-lesion-v1.zip",      # not bundled: the archive users import
         "sha256": "...", "size": 1234, "min_gpu_memory_gb": 8, "description": "..."}
      ]
    }

This module needs only the standard library (it runs in Slicer before torch is installed).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Optional, Union

from . import modelformat

PathLike = Union[str, "os.PathLike[str]"]

ENV_MODELS_DIR = "MEDDIFFFM_MODELS_DIR"
ENV_RESOURCES_DIR = "MEDDIFFFM_RESOURCES_DIR"
REGISTRY_NAME = "models.json"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
KINDS = ("base", "controlnet")
# Files that may carry pickled code: never imported, never loaded.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".npy", ".joblib")
# Extra files an imported model directory may carry besides config.json and model.safetensors.
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class WeightsError(ValueError):
    """A model that cannot be found, imported or trusted, with the reason in words."""


class ModelNotFoundError(WeightsError, FileNotFoundError):
    """No model directory for a name, with what the user can do about it."""


@dataclass(frozen=True)
class ModelEntry:
    """One model: a registry entry, or a custom model found in the cache.

    Attributes:
        id: unique name, also the cache directory name.
        kind: "base" or "controlnet".
        task: for a ControlNet, the task it conditions (e.g. "lesion").
        base: for a ControlNet, the id of the base model it was trained on.
        path: for a bundled model, its directory relative to ``Resources/``.
        file: for a downloadable model, the archive file name users import.
        sha256: SHA-256 of ``model.safetensors`` (hex); None for custom models.
        size: size of ``model.safetensors`` in bytes, if known.
        location: the directory that holds the model on this computer, or None.
        source: "bundled", "cache" or "custom".
    """

    id: str
    version: str = ""
    kind: str = "base"
    task: Optional[str] = None
    base: Optional[str] = None
    path: Optional[str] = None
    file: Optional[str] = None
    sha256: Optional[str] = None
    size: Optional[int] = None
    min_gpu_memory_gb: Optional[float] = None
    description: str = ""
    location: Optional[Path] = field(default=None, compare=False)
    source: str = "cache"

    @property
    def available(self) -> bool:
        return self.location is not None

    def label(self) -> str:
        """Short text for a combo box."""
        text = self.id if not self.version else f"{self.id} ({self.version})"
        if self.kind == "controlnet" and self.task:
            text += f" [{self.task}]"
        if not self.available:
            text += " - not installed"
        return text


# ---------------------------------------------------------------------------------------------
# Locations


def resources_dir() -> Path:
    """The extension's ``Resources/`` folder (beside the ``MedDiffFMLib`` package)."""
    env = os.environ.get(ENV_RESOURCES_DIR)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "Resources"


def registry_path() -> Path:
    return resources_dir() / REGISTRY_NAME


def cache_dir() -> Path:
    """Where imported weights live: ``$MEDDIFFFM_MODELS_DIR`` or ``~/.meddifffm/models``."""
    env = os.environ.get(ENV_MODELS_DIR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".meddifffm" / "models"


# ---------------------------------------------------------------------------------------------
# Registry


def _check_entry(raw: dict, where: str) -> ModelEntry:
    if not isinstance(raw, dict):
        raise WeightsError(f"{where}: each model entry must be a JSON object")
    known = {"id", "version", "kind", "task", "base", "path", "file", "sha256", "size", "min_gpu_memory_gb",
             "description", "url"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise WeightsError(f"{where}: unknown field(s) {unknown}")
    mid = raw.get("id")
    if not isinstance(mid, str) or not _ID.match(mid):
        raise WeightsError(f"{where}: 'id' must be letters, digits, '.', '_' or '-', got {mid!r}")
    kind = raw.get("kind", "base")
    if kind not in KINDS:
        raise WeightsError(f"{where} ({mid}): 'kind' must be one of {KINDS}, got {kind!r}")
    if kind == "controlnet" and not (raw.get("task") and raw.get("base")):
        raise WeightsError(f"{where} ({mid}): a controlnet entry needs 'task' and 'base'")
    sha = raw.get("sha256")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise WeightsError(f"{where} ({mid}): 'sha256' must be 64 lower-case hex digits")
    path = raw.get("path")
    if path is not None:
        p = PurePosixPath(path)
        if p.is_absolute() or ".." in p.parts or "\\" in path:
            raise WeightsError(f"{where} ({mid}): 'path' must be relative to Resources/ without '..'")
    if path is None and raw.get("file") is None:
        raise WeightsError(f"{where} ({mid}): give 'path' (bundled) or 'file' (archive to import)")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise WeightsError(f"{where} ({mid}): 'size' must be a number of bytes")
    return ModelEntry(
        id=mid, version=str(raw.get("version", "")), kind=kind, task=raw.get("task"), base=raw.get("base"),
        path=path, file=raw.get("file"), sha256=sha, size=size,
        min_gpu_memory_gb=raw.get("min_gpu_memory_gb"), description=str(raw.get("description", "")),
        source="bundled" if path is not None else "cache")


def load_registry(path: Optional[PathLike] = None) -> tuple[list[ModelEntry], Optional[str]]:
    """Read and check ``models.json``: (entries, default id). A missing file is an empty registry."""
    path = Path(path) if path is not None else registry_path()
    if not path.is_file():
        return [], None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("models", []), list):
        raise WeightsError(f"{path}: expected an object with a 'models' list")
    entries = [_check_entry(raw, f"{path.name} model #{n}") for n, raw in enumerate(data.get("models", []))]
    ids = [e.id for e in entries]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise WeightsError(f"{path}: duplicate model id(s) {dupes}")
    for e in entries:
        if e.kind == "controlnet" and e.base not in ids:
            raise WeightsError(f"{path}: controlnet {e.id!r} names base {e.base!r}, which is not in the registry")
    default = data.get("default")
    if default is not None and default not in ids:
        raise WeightsError(f"{path}: default model {default!r} is not in the registry")
    return entries, default


def _registry_entry(model_id: str) -> Optional[ModelEntry]:
    entries, _ = load_registry()
    for e in entries:
        if e.id == model_id:
            return e
    return None


def _is_model_dir(d: Path) -> bool:
    return (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file()


def _locate(entry: ModelEntry) -> Optional[Path]:
    if entry.path is not None:
        bundled = resources_dir() / entry.path
        if _is_model_dir(bundled):
            return bundled
    cached = cache_dir() / entry.id
    if _is_model_dir(cached):
        return cached
    return None


def _read_config(model_dir: Path) -> dict:
    try:
        cfg = json.loads((model_dir / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{model_dir / CONFIG_NAME} is not a readable JSON file: {e}") from e
    if not isinstance(cfg, dict):
        raise WeightsError(f"{model_dir / CONFIG_NAME} must hold a JSON object")
    return cfg


def list_models() -> list[ModelEntry]:
    """Registry models (with where they are installed, if anywhere), then custom cache models."""
    entries, _ = load_registry()
    out = []
    for e in entries:
        loc = _locate(e)
        source = "bundled" if loc is not None and e.path is not None and loc == resources_dir() / e.path else "cache"
        out.append(replace(e, location=loc, source=source))
    known = {e.id for e in entries}
    root = cache_dir()
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.name in known or d.name.startswith(".") or not d.is_dir() or not _is_model_dir(d):
                continue
            try:
                cfg = _read_config(d)
            except WeightsError:
                continue
            kind = cfg.get("kind", "base")
            out.append(ModelEntry(
                id=d.name, version=str(cfg.get("version", "")), kind=kind if kind in KINDS else "base",
                task=cfg.get("task"), base=cfg.get("base"), description=str(cfg.get("description", "")),
                location=d, source="custom"))
    return out


def default_model_id(kind: str = "base", task: Optional[str] = None) -> Optional[str]:
    """The registry's default base model, or the default ControlNet for ``task``."""
    entries, default = load_registry()
    if kind == "base":
        if default is not None:
            return default
        bases = [e.id for e in entries if e.kind == "base"]
        return bases[0] if bases else None
    base = default_model_id("base")
    nets = [e for e in entries if e.kind == "controlnet" and (task is None or e.task == task)]
    nets.sort(key=lambda e: e.base != base)  # ControlNets of the default base first
    return nets[0].id if nets else None


def resolve_model(name_or_path: Optional[PathLike] = None, *, kind: str = "base",
                  task: Optional[str] = None) -> Path:
    """The directory of a model.

    Args:
        name_or_path: a model directory (returned as it is), a registry id, the name of a custom
            model in the cache, or None for the default model of ``kind`` (and ``task``).
        kind: with ``None``: "base" or "controlnet".
        task: with ``None`` and ``kind="controlnet"``: the task whose ControlNet to use.

    Raises:
        ModelNotFoundError: with what to do (import the weights, check the path).
    """
    if name_or_path is None:
        mid = default_model_id(kind, task)
        if mid is None:
            what = f"{kind} model" + (f" for task {task!r}" if task else "")
            raise ModelNotFoundError(
                f"no default {what} is registered in {registry_path()}; give a model directory or import "
                f"weights (Slicer: 'Import weights...'; Python: MedDiffFMLib.weights.import_weights)")
        name_or_path = mid
    text = os.fspath(name_or_path)
    as_path = Path(text).expanduser()
    if as_path.is_dir():
        if not _is_model_dir(as_path):
            raise ModelNotFoundError(f"{as_path} is not a model directory: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        return as_path
    entry = _registry_entry(text) if _ID.match(text) else None
    if entry is not None:
        found = _locate(entry)
        if found is not None:
            return found
        hint = f" (archive {entry.file})" if entry.file else ""
        raise ModelNotFoundError(
            f"model {text!r} is registered but not installed{hint}; import it with 'Import weights...' in Slicer "
            f"or MedDiffFMLib.weights.import_weights(path) (cache: {cache_dir()})")
    if _ID.match(text):
        cached = cache_dir() / text
        if _is_model_dir(cached):
            return cached
    looks_like_path = any(sep in text for sep in ("/", "\\")) or text.startswith((".", "~"))
    if looks_like_path:
        raise ModelNotFoundError(f"model directory {text!r} does not exist")
    known = [e.id for e in list_models()]
    raise ModelNotFoundError(f"unknown model {text!r}; known models: {known or 'none'} (cache: {cache_dir()})")


# ---------------------------------------------------------------------------------------------
# Verification


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify(model_dir: PathLike, expected_sha256: Optional[str] = None) -> str:
    """Check a model directory and return the SHA-256 of its weights.

    Checks: every key and type of ``config.json`` (:func:`MedDiffFMLib.modelformat.check_config`),
    the header and byte layout of ``model.safetensors`` (a truncated file is refused), no pickle
    files are present, and the SHA-256 matches ``expected_sha256`` or, when the directory name
    (or the config's ``id``) is a registry id, the registry's value.

    Raises:
        WeightsError: on the first problem, in words.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise WeightsError(f"model directory {d} does not exist")
    if not (d / CONFIG_NAME).is_file():
        raise WeightsError(f"{d} is not a model directory: {CONFIG_NAME} is missing")
    if not (d / WEIGHTS_NAME).is_file():
        raise WeightsError(f"{d} is not a model directory: {WEIGHTS_NAME} is missing")
    cfg = _read_config(d)
    pickles = sorted(p.name for p in d.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(f"{d} contains pickle-format files {pickles}; only safetensors weights are accepted")
    try:
        modelformat.check_config(cfg, d / CONFIG_NAME)
        modelformat.check_safetensors(d / WEIGHTS_NAME)
    except modelformat.ModelFormatError as e:
        raise WeightsError(str(e)) from None
    digest = sha256_file(d / WEIGHTS_NAME)
    if expected_sha256 is None:
        for candidate in (cfg.get("id"), d.name):
            entry = _registry_entry(candidate) if isinstance(candidate, str) and _ID.match(candidate) else None
            if entry is not None:
                expected_sha256 = entry.sha256
                break
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise WeightsError(
            f"{d / WEIGHTS_NAME} does not match the registry: SHA-256 {digest}, expected {expected_sha256}. "
            f"The file is damaged or a different version; download it again.")
    return digest


# Import and removal live in weights_import (re-exported here: ``weights.import_weights``).
from .weights_import import import_weights, remove_model  # noqa: E402,F401
