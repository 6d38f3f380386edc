"""The module's small model manager: installed models with size and SHA-256, import, remove, and
where they live. Plain Python on top of :mod:`MedDiffFMLib.weights` (no torch, no Qt).

The models folder: the Slicer setting ``MedDiffFM/ModelsDirectory`` (read on the main thread by
the module) is handed to the library and the worker through ``MEDDIFFFM_MODELS_DIR``; an empty
setting means the library's default, so the variable is removed again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import MutableMapping, Optional

from MedDiffFMLib import weights


@dataclass(frozen=True)
class InstalledModel:
    """One model found on this computer.

    Attributes:
        id, kind, task: as in the registry (task: the ControlNet's task).
        location: the model folder.
        source: "bundled" (ships with the extension; never removed), "cache" or "custom".
        size_bytes: all files of the folder together.
        sha256: of ``model.safetensors``.
        registered_sha256: the registry's checksum (None for custom models).
    """

    id: str
    kind: str
    task: Optional[str]
    location: Path
    source: str
    size_bytes: int
    sha256: str
    registered_sha256: Optional[str]

    @property
    def removable(self) -> bool:
        return self.source != "bundled"

    @property
    def verified(self) -> Optional[bool]:
        """True / False against the registry's checksum; None when the registry has none."""
        return None if self.registered_sha256 is None else self.sha256 == self.registered_sha256


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    """SHA-256 of a file, remembered while its size and modification time stay the same."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = weights.sha256_file(path)
    return _SHA_CACHE[key]


def installed_models() -> list[InstalledModel]:
    """Every model installed here (bundled, imported into the models folder, custom)."""
    out = []
    for entry in weights.list_models():
        if entry.location is None:
            continue
        location = Path(entry.location)
        size = sum(p.stat().st_size for p in location.rglob("*") if p.is_file())
        out.append(InstalledModel(entry.id, entry.kind, entry.task, location, entry.source, size,
                                  _sha256(location / weights.WEIGHTS_NAME), entry.sha256))
    return out


def import_model(path: str) -> Path:
    """Import a model archive (.zip), a model folder or its ``config.json``; the new folder."""
    if os.path.basename(path) == weights.CONFIG_NAME:
        path = os.path.dirname(path)
    return weights.import_weights(path)


def remove_model(model_id: str) -> None:
    """Delete an imported model (bundled models are refused with a clear message)."""
    found = {m.id: m for m in installed_models()}
    if model_id not in found:
        raise ValueError(f"no installed model {model_id!r}")
    if not found[model_id].removable:
        raise ValueError(f"{model_id} ships with the extension and cannot be removed")
    weights.remove_model(model_id)


# MEDDIFFFM_MODELS_DIR as Slicer was started with it (the default when the setting is empty).
STARTUP_MODELS_DIR = os.environ.get(weights.ENV_MODELS_DIR)


def apply_models_directory(saved: str, environ: MutableMapping[str, str] = os.environ,
                           startup: Optional[str] = STARTUP_MODELS_DIR) -> None:
    """Hand the models-folder setting to the library and the worker (through ``environ``).

    An empty setting restores the default: the variable as Slicer was started with it, or none
    (``~/.meddifffm/models``); it is not left pointing at the previous folder."""
    if saved:
        environ[weights.ENV_MODELS_DIR] = saved
    elif startup:
        environ[weights.ENV_MODELS_DIR] = startup
    else:
        environ.pop(weights.ENV_MODELS_DIR, None)
