"""Importing a model (a .zip archive or a folder) into the cache, and removing one.

Part of :mod:`MedDiffFMLib.weights` (``weights.import_weights``, ``weights.remove_model``);
standard library only. Archives are unpacked into a temporary folder inside the cache and
renamed into place only after :func:`~MedDiffFMLib.weights.verify` passes; a failed import
leaves the cache as it was, and its messages name the archive, not the temporary folder.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Optional

from .weights import (_ID, CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, PathLike, WeightsError, _is_model_dir,
                      _read_config, _registry_entry, cache_dir, load_registry, sha256_file, verify)

# Extra files an imported model directory may carry besides config.json and model.safetensors.
_EXTRA_FILE = re.compile(r"(?i)^(readme|license|licence|notice|model_card|citation)[\w.-]*$|^[\w.-]+\.(md|txt|json)$")

def _safe_member_path(name: str) -> PurePosixPath:
    """The relative path of a zip member, refusing absolute paths, drive letters and '..'."""
    if "\x00" in name:
        raise WeightsError(f"refusing zip member with a NUL byte: {name!r}")
    norm = name.replace("\\", "/")
    p = PurePosixPath(norm)
    if norm.startswith("/") or p.is_absolute() or re.match(r"^[A-Za-z]:", norm) or ".." in p.parts:
        raise WeightsError(f"refusing zip member outside the archive folder (path traversal): {name!r}")
    return p


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            rel = _safe_member_path(info.filename)
            mode = (info.external_attr >> 16) & 0xFFFF
            if stat.S_ISLNK(mode):
                raise WeightsError(f"refusing symbolic link in the archive: {info.filename!r}")
            if not rel.parts or rel.parts[0] == "__MACOSX":
                continue
            target = dest.joinpath(*rel.parts)
            if not str(target.resolve()).startswith(str(dest.resolve()) + os.sep):
                raise WeightsError(f"refusing zip member outside the archive folder: {info.filename!r}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def _find_model_dir(root: Path) -> Path:
    found = sorted({p.parent for p in root.rglob(CONFIG_NAME) if (p.parent / WEIGHTS_NAME).is_file()})
    if not found:
        raise WeightsError(f"no model found: the archive or folder must contain {CONFIG_NAME} and {WEIGHTS_NAME}")
    if len(found) > 1:
        names = [str(p.relative_to(root)) for p in found]
        raise WeightsError(f"the archive holds several models {names}; import them one at a time")
    return found[0]


def _model_id_for(model_dir: Path, staging: Path, source: Path) -> str:
    cfg = _read_config(model_dir)
    candidates = [cfg.get("id")]
    if model_dir != staging:
        candidates.append(model_dir.name)
    stem = source.name[:-4] if source.name.lower().endswith(".zip") else source.name
    candidates.append(re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._"))
    for c in candidates:
        if isinstance(c, str) and _ID.match(c):
            return c
    raise WeightsError(f"cannot name the model from {source}: give model_id")


def import_weights(source: PathLike, model_id: Optional[str] = None, *, overwrite: bool = True) -> Path:
    """Copy a model (a .zip archive or a model directory) into the cache and return its directory.

    The model id is ``model_id``, else the config's ``id``, else the folder name, else the archive
    name. When the id is in the registry, the weights must match its SHA-256. The copy is atomic:
    files are unpacked into a temporary folder inside the cache and renamed into place only after
    they pass :func:`verify`; a failed import leaves the cache as it was.

    Raises:
        WeightsError: unreadable archive, path traversal, pickle files, missing files, checksum
            mismatch, or an existing different model of that id when ``overwrite`` is False.
    """
    src = Path(source).expanduser()
    if not src.exists():
        raise WeightsError(f"{src} does not exist")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".import-", dir=root))
    try:
        staging = tmp / "unpacked"
        staging.mkdir()
        if src.is_dir():
            found = _find_model_dir(src)
            rel = found.relative_to(src)
            copy_to = staging / (found.name if str(rel) != "." else src.name)
            copy_to.mkdir(parents=True)
            for f in found.iterdir():
                if f.is_file() and (f.name in (CONFIG_NAME, WEIGHTS_NAME) or _EXTRA_FILE.match(f.name)):
                    shutil.copy2(f, copy_to / f.name)
                elif f.suffix.lower() in PICKLE_SUFFIXES:
                    raise WeightsError(f"{f} is a pickle-format file; only safetensors weights are accepted")
        elif zipfile.is_zipfile(src):
            _extract_zip(src, staging)
        else:
            raise WeightsError(f"{src} is neither a model folder nor a .zip archive")
        model_dir = _find_model_dir(staging)
        try:
            mid = model_id or _model_id_for(model_dir, staging, src)
            if not _ID.match(mid):
                raise WeightsError(f"invalid model id {mid!r}")
            entry = _registry_entry(mid)
            digest = verify(model_dir, expected_sha256=entry.sha256 if entry is not None else None)
        except WeightsError as e:
            # name the model where the user has it: the temporary copy is gone once this is read
            inside = model_dir.relative_to(staging).as_posix()
            shown = str(found) if src.is_dir() else f"{src}: {inside}"
            raise WeightsError(str(e).replace(str(model_dir), shown)) from None
        if entry is None and model_id is None:
            # A renamed archive of a released model: recognise it by its checksum.
            same = [e for e in load_registry()[0] if e.sha256 == digest]
            if same:
                mid = same[0].id
        target = root / mid
        if target.exists():
            if _is_model_dir(target) and sha256_file(target / WEIGHTS_NAME) == digest:
                return target  # same weights already installed
            if not overwrite:
                raise WeightsError(f"a different model named {mid!r} is already in {root}; remove it first")
            old = tmp / "previous"
            os.replace(target, old)
            try:
                os.replace(model_dir, target)
            except OSError:
                os.replace(old, target)  # put the previous model back
                raise
            return target
        os.replace(model_dir, target)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_model(model_id: str) -> None:
    """Delete a model from the cache (bundled models are never touched)."""
    if not _ID.match(model_id):
        raise WeightsError(f"invalid model id {model_id!r}")
    target = cache_dir() / model_id
    if target.is_dir():
        shutil.rmtree(target)
