"""Training cases: one volume on its own grid, from phantoms, arrays or a manifest of files."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .. import anatomy
from ..networks import NULL_REGION, REGION_INDEX, ModelConfig


@dataclass
class Case:
    """One training volume on its own grid.

    Attributes:
        image: (D, H, W) float32 tensor in model units [-1, 1].
        spacing: voxel size (k, j, i) in mm.
        groups: (D, H, W) int8 anatomy group map, or None when the case has no labels.
        region: region index (1..3), or 0 when unknown.
        control: (C, D, H, W) task condition for ControlNet training, or None.
        control_fn: or a function (image, generator) -> (C, D, H, W) drawing a new condition
            for every sample (super-resolution draws its factor per sample).
        focus: optional (N, 3) voxel indices that crops should contain (e.g. lesion voxels), used
            for half of the crops so that small structures are seen often enough.
        name: for logs.
    """

    image: torch.Tensor
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    groups: Optional[torch.Tensor] = None
    region: int = NULL_REGION
    control: Optional[torch.Tensor] = None
    control_fn: Optional[Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = None
    focus: Optional[torch.Tensor] = None
    name: str = ""


def case_from_arrays(hu: np.ndarray, ijk_to_ras: np.ndarray, region: Optional[str], cfg: ModelConfig,
                     labels: Optional[np.ndarray] = None, label_names=None, name: str = "") -> Case:
    """A CT (and its labels) windowed to model units on its own grid (no resampling: the model
    is conditioned on voxel size, so it learns at the resolution the data come at)."""
    from .. import preprocessing
    from ..geometry import spacing_kji

    if region is None:
        region = preprocessing.guess_region(hu, ijk_to_ras)
    region = preprocessing.check_region(region)
    unit = preprocessing.hu_to_unit(hu.astype(np.float32), region)
    groups = None
    if labels is not None:
        g, _unknown = anatomy.group_map(np.asarray(labels).astype(np.int64), label_names)
        groups = torch.from_numpy(g)
    spacing = tuple(float(s) for s in spacing_kji(ijk_to_ras))
    return Case(torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32)), spacing, groups,
                REGION_INDEX[region], name=name)


def random_training_grid(rng: np.random.Generator, fov_mm: Sequence[float] = (192.0, 256.0, 256.0),
                         spacing_range_mm: tuple[float, float] = (0.5, 5.0), max_voxels: int = 4_000_000,
                         min_slices: int = 24, thin_slice_mm: Optional[float] = None
                         ) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """A clinical-like grid: in-plane and slice spacing drawn log-uniformly and independently
    in ``spacing_range_mm`` (``thin_slice_mm``: slices of at most that, as super-resolution
    targets need), the in-plane field of view whole, and the slab along k shortened so that the
    case holds at most ``max_voxels`` voxels.

    Returns:
        (shape_kji, spacing_kji).
    """
    lo, hi = spacing_range_mm
    log_u = lambda a, b: float(np.exp(rng.uniform(np.log(a), np.log(b))))  # noqa: E731
    s_ij = log_u(max(lo, 0.6), max(max(lo, 0.6), min(hi, 3.0)))
    s_k = log_u(lo, max(lo, min(hi, thin_slice_mm)) if thin_slice_mm else hi)
    n_j, n_i = (max(8, int(round(f / s_ij))) for f in fov_mm[1:])
    n_k = max(min_slices, min(int(round(fov_mm[0] / s_k)), max_voxels // (n_j * n_i)))
    return (n_k, n_j, n_i), (s_k, s_ij, s_ij)


def clinical_range(cfg: ModelConfig, clinical_mm: tuple[float, float] = (0.5, 5.0)) -> tuple[float, float]:
    """The voxel sizes training cases are drawn at: the model's range within clinical CT's."""
    lo, hi = max(cfg.spacing_range_mm[0], clinical_mm[0]), min(cfg.spacing_range_mm[1], clinical_mm[1])
    return (lo, hi) if lo <= hi else (cfg.spacing_range_mm[0],) * 2


PHANTOM_FAMILIES = ("adult", "miniature")


def draw_phantom(seed: int, region: str, cfg: ModelConfig, family: str = "adult",
                 fov_mm: Sequence[float] = (192.0, 256.0, 256.0), max_voxels: int = 1_000_000,
                 thin_slice_mm: Optional[float] = None, lesions: int = 0, noise_hu: float = 0.0):
    """One training phantom on a random clinical-like grid, voxel sizes in :func:`clinical_range`.

    ``family``:

    * ``"adult"`` (:func:`~MedDiffFMLib.phantoms.training_phantom`): the body at adult size
      and a random sub-box of it of at most ``max_voxels`` voxels, on an oblique grid (70 %),
      with every variation of the phantom family on; ``fov_mm`` is not used;
    * ``"miniature"``: the whole body scaled into a field of view of ``fov_mm`` (k, j, i) on an
      axial grid (:func:`random_training_grid`), for tests and tiny models.

    The grid is drawn from ``seed`` (``thin_slice_mm``: slices of at most that).
    """
    from ..phantoms import add_ct_noise, make_phantom, training_phantom

    if family not in PHANTOM_FAMILIES:
        raise ValueError(f"phantom family must be one of {PHANTOM_FAMILIES}, got {family!r}")
    shape, spacing = random_training_grid(np.random.default_rng([seed, 7]), fov_mm, clinical_range(cfg),
                                          max_voxels=max_voxels, thin_slice_mm=thin_slice_mm)
    if family == "miniature":
        return make_phantom(region, shape_kji=shape, spacing_kji=spacing, seed=seed, lesions=lesions,
                            noise_hu=noise_hu)
    ph = training_phantom(seed, region, spacing_kji=spacing, max_voxels=max_voxels, max_samples=4 * max_voxels,
                          lesions=lesions)
    if noise_hu > 0:
        ph = dataclasses.replace(ph, hu=add_ct_noise(ph.clean_hu, noise_hu, seed, ph.spacing_kji))
    return ph


def phantom_cases(n: int, cfg: ModelConfig, seed: int = 0, regions: Sequence[str] = ("head_neck", "chest", "abdomen"),
                  fov_mm: Sequence[float] = (192.0, 256.0, 256.0), noise_hu: float = 0.0,
                  max_voxels: int = 1_000_000, thin_slice_mm: Optional[float] = None,
                  family: str = "adult") -> list[Case]:
    """``n`` phantom cases (cycling through ``regions``), each drawn by :func:`draw_phantom`.

    Seeds ``seed .. seed + n - 1`` are used: keep evaluation seeds outside that range.
    """
    from ..preprocessing import hu_to_unit

    cases = []
    for i in range(n):
        region = regions[i % len(regions)]
        ph = draw_phantom(seed + i, region, cfg, family, fov_mm, max_voxels, thin_slice_mm, noise_hu=noise_hu)
        g, _ = anatomy.group_map(ph.labels, ph.label_names)
        cases.append(Case(torch.from_numpy(hu_to_unit(ph.hu, region).astype(np.float32)), ph.spacing_kji,
                          torch.from_numpy(g), REGION_INDEX[region], name=f"phantom-{family}-{region}-{seed + i}"))
    return cases


def manifest_cases(manifest: str | os.PathLike, cfg: ModelConfig, default_region: Optional[str] = None) -> list[Case]:
    """Cases from a JSON manifest ``[{"image": ..., "labels": ..., "region": ...}, ...]`` (paths
    relative to the manifest) or from a folder of images (``*.nii.gz``, ``*.nii``, ``*.nrrd``,
    ``*.mha``) with optional label maps of the same name in a ``labels/`` sub-folder."""
    from .. import io

    path = Path(manifest)
    entries = []
    if path.is_dir():
        for img in sorted(p for p in path.iterdir() if p.is_file() and _is_image(p)):
            lab = path / "labels" / img.name
            entries.append({"image": str(img), "labels": str(lab) if lab.exists() else None,
                            "region": default_region})
    elif path.is_file():
        raw = json.loads(path.read_text(encoding="utf-8"))
        for e in raw:
            if "image" not in e:
                raise ValueError(f"manifest entry without 'image': {e}")
            entries.append({"image": str(path.parent / e["image"]),
                            "labels": str(path.parent / e["labels"]) if e.get("labels") else None,
                            "region": e.get("region", default_region)})
    else:
        raise FileNotFoundError(f"no training data at {path}")
    if not entries:
        raise ValueError(f"no images found in {path}")
    cases = []
    for e in entries:
        vol = io.read_volume(e["image"])
        labels, names = (None, None)
        if e["labels"]:
            lv, names = io.read_labelmap(e["labels"])
            labels = lv.array
        cases.append(case_from_arrays(vol.array, vol.ijk_to_ras, e["region"], cfg, labels, names,
                                      name=Path(e["image"]).name))
    return cases


def _is_image(p: Path) -> bool:
    n = p.name.lower()
    return n.endswith((".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"))
