"""Manifests (CSV / JSON) of a cohort, and which process takes which case."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

COLUMNS = ("id", "image", "mask", "anatomy", "region")


@dataclass(frozen=True)
class Case:
    """One manifest row with paths resolved. ``id`` names the case's output folder."""

    id: str
    image: Optional[Path] = None
    mask: Optional[Path] = None
    anatomy: Optional[Path] = None
    region: Optional[str] = None


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
