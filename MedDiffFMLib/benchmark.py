"""Benchmark of the six tasks on held-out phantoms, against simple classical baselines.

``meddiff-fm benchmark`` (or :func:`run_benchmark`) generates phantoms with seeds from
``seed_start`` (default 100 000; training uses seeds below 10 000) at the model's own
spacing over a fixed field of view (default 192 x 256 x 256 mm, as in training), cycling
through the regions head_neck, chest, abdomen, and measures for every case:

1. denoising (two low-dose-like noise levels): PSNR and SSIM of the noisy input, a Gaussian
   filter (sigma tuned on separate tuning phantoms), 3-D non-local means, BM4D (when the
   optional ``bm4d`` package is installed) and the model;
2. anomaly detection (phantoms with inserted lesions and healthy ones): voxel AUROC,
   volume AUROC and mask Dice, for the model (the phantom's label map given as the anatomy
   condition, as a TotalSegmentator result would be) and an organ-median deviation baseline;
3. synthesis from the phantom's label map: per organ group, the error of the mean HU and the
   Dice of a nearest-mean threshold segmentation against the conditioning masks, for the
   model, trivial images and the real phantom (the ceiling of that segmentation);
4. super-resolution (superres ControlNet): PSNR / SSIM against the thin-slice truth, for
   the model and trilinear / cubic interpolation;
5. inpainting (lesion ControlNet, healthy and lesion content) inside an ellipsoid placed in
   healthy organ tissue: outside-mask identity, mean and spread inside vs the organ ring;
6. lesion generation (lesion ControlNet) in the same kind of mask: contrast and the Dice of
   a threshold segmentation, next to the unchanged input and the phantom's own lesions.

Every number is computed on the phantoms of the run; rows report mean +- standard deviation
over cases (sample std, shown when n >= 2). These are synthetic phantoms: the table says how
a model behaves on them, not how it would do on patients.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import anatomy, metrics, preprocessing

ALL_TASKS = ("denoise", "anomaly", "synthesis", "superres", "inpaint", "lesion")
_TASK_ALIASES = {"denoise": "denoise", "denoising": "denoise", "anomaly": "anomaly", "synthesis": "synthesis",
                 "synthesize": "synthesis", "superres": "superres", "super-resolution": "superres",
                 "inpaint": "inpaint", "inpainting": "inpaint", "lesion": "lesion"}
# benchmark section -> run_task name
RUN_TASK_NAME = {"denoise": "denoise", "anomaly": "anomaly", "synthesis": "synthesize", "superres": "superres",
                 "inpaint": "inpaint", "lesion": "lesion"}
REGIONS = ("head_neck", "chest", "abdomen")
FOV_MM = (192.0, 256.0, 256.0)
SEED_START = 100_000
SEEDS_PER_CASE = 10
TUNE_SEED_OFFSET = 900_000
NOISE_LEVELS_HU = (25.0, 40.0)
GAUSSIAN_SIGMAS_VOX = (0.3, 0.4, 0.5, 0.6, 0.75, 1.0, 1.25, 1.5, 2.0)
NLM_PATCH_SIZE = 5
NLM_PATCH_DISTANCE = 3
NLM_H_FACTOR = 0.6
ANOMALY_LESIONS = 2
PHANTOM_NOISE_HU = 12.0
MIN_GROUP_FRACTION = 0.005

# metric key -> (column label, decimals)
METRICS: dict[str, tuple[str, int]] = {
    "psnr_db": ("PSNR (dB)", 2),
    "ssim": ("SSIM", 3),
    "sigma_est_hu": ("noise estimate (HU)", 1),
    "voxel_auroc": ("voxel AUROC", 3),
    "volume_auroc": ("volume AUROC", 3),
    "dice": ("Dice", 3),
    "flagged_ml": ("flagged (ml)", 2),
    "outside_identical": ("outside identical", 4),
    "delta_mean_hu": ("mask - ring mean (HU)", 1),
    "std_in_hu": ("std in mask (HU)", 1),
    "std_ring_hu": ("std ring (HU)", 1),
    "contrast_hu": ("contrast (HU)", 1),
    "abs_contrast_hu": ("|contrast| (HU)", 1),
    "mean_hu_abs_error": ("|mean HU error|", 1),
    "threshold_dice": ("threshold Dice", 3),
    "seconds": ("time (s)", 1),
}

SECTION_TITLES = {
    "denoise": "Denoising",
    "anomaly": "Anomaly detection",
    "synthesis": "Synthesis from anatomy",
    "superres": "Super-resolution",
    "inpaint": "Inpainting",
    "lesion": "Lesion generation",
}


# --------------------------------------------------------------------------- options
@dataclass
class BenchmarkOptions:
    """What to run and on which phantoms.

    Attributes:
        cases: phantoms per task (regions cycle head_neck, chest, abdomen).
        seed_start: first seed; case ``i`` uses seeds ``seed_start + 10 i`` .. ``+ 9``
            (see :func:`case_seeds`). Keep it >= 10 000 (training phantoms use seeds below).
        tasks: benchmark sections to run, from :data:`ALL_TASKS`.
        fov_mm: phantom field of view (k, j, i) in mm; the grid is fov / model spacing.
        noise_levels_hu: denoising noise levels (standard deviation in HU).
        steps: reverse steps per task (section name -> steps); missing: the task's default.
        device: "auto", "cpu", "cuda" or "cuda:N" for the model.
        bm4d: run BM4D when the optional ``bm4d`` package is installed.
        nlm: run 3-D non-local means.
        progress: one line per step on stderr.
    """

    cases: int = 3
    seed_start: int = SEED_START
    tasks: Sequence[str] = ALL_TASKS
    fov_mm: Sequence[float] = FOV_MM
    noise_levels_hu: Sequence[float] = NOISE_LEVELS_HU
    steps: dict = field(default_factory=dict)
    device: str = "auto"
    bm4d: bool = True
    nlm: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.tasks = tuple(parse_tasks(self.tasks))
        if int(self.cases) < 1:
            raise ValueError("cases must be >= 1")
        if int(self.seed_start) < 10_000:
            raise ValueError("seed_start must be >= 10000: seeds below are used for training phantoms")
        fov = tuple(float(f) for f in self.fov_mm)
        if len(fov) != 3 or min(fov) <= 0:
            raise ValueError(f"fov_mm must be three positive sizes (k, j, i) in mm, got {self.fov_mm}")
        self.fov_mm = fov
        self.noise_levels_hu = tuple(float(n) for n in self.noise_levels_hu)
        if not self.noise_levels_hu or min(self.noise_levels_hu) <= 0 or len(self.noise_levels_hu) > 8:
            raise ValueError("noise_levels_hu must hold 1 to 8 positive levels")
        steps = {}
        for k, v in dict(self.steps or {}).items():
            name = _TASK_ALIASES.get(str(k).lower())
            if name is None:
                raise ValueError(f"steps for unknown task {k!r}; tasks: {', '.join(ALL_TASKS)}")
            if int(v) < 1:
                raise ValueError(f"steps must be >= 1, got {v} for {k}")
            steps[name] = int(v)
        self.steps = steps


def parse_tasks(tasks) -> list[str]:
    """Section names from a list or a comma-separated string (aliases such as "synthesize" accepted)."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    out = []
    for t in tasks:
        name = _TASK_ALIASES.get(str(t).strip().lower())
        if name is None:
            raise ValueError(f"unknown benchmark task {t!r}; choose from {', '.join(ALL_TASKS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("no benchmark task selected")
    return [t for t in ALL_TASKS if t in out]


def parse_steps(items: Optional[Sequence[str]]) -> dict:
    """``["10"]`` -> the same steps for every task; ``["denoise=10", "anomaly=20"]`` -> per task."""
    out: dict = {}
    for item in items or []:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part:
                k, v = part.split("=", 1)
                name = _TASK_ALIASES.get(k.strip().lower())
                if name is None:
                    raise ValueError(f"--steps: unknown task {k!r}")
                out[name] = int(v)
            else:
                for t in ALL_TASKS:
                    out[t] = int(part)
    return out


def case_region(i: int) -> str:
    return REGIONS[i % len(REGIONS)]


def case_seeds(seed_start: int, i: int) -> dict:
    """Seeds of case ``i``: the phantom (healthy, 12 HU noise), the lesion phantom (anomaly)
    and one noise realisation per denoising level."""
    s = int(seed_start) + SEEDS_PER_CASE * int(i)
    return {"phantom": s, "lesion_phantom": s + 1, "noise": [s + 2 + j for j in range(SEEDS_PER_CASE - 2)]}


def tuning_seeds(seed_start: int, region: str) -> dict:
    """Seeds of the separate tuning phantom of ``region`` (Gaussian sigma) and its noise."""
    s = int(seed_start) + TUNE_SEED_OFFSET + SEEDS_PER_CASE * REGIONS.index(region)
    return {"phantom": s, "noise": [s + 2 + j for j in range(SEEDS_PER_CASE - 2)]}


def phantom_shape(fov_mm: Sequence[float], spacing_mm: float) -> tuple[int, int, int]:
    return tuple(max(1, int(round(f / spacing_mm))) for f in fov_mm)  # type: ignore[return-value]


def make_case_phantom(region: str, shape, spacing_mm: float, seed: int, lesions: int = 0,
                      noise_hu: float = PHANTOM_NOISE_HU):
    from .phantoms import make_phantom

    return make_phantom(region, shape_kji=tuple(shape), spacing_kji=(spacing_mm,) * 3, seed=seed, lesions=lesions,
                        noise_hu=noise_hu)


def noisy_image(clean_hu: np.ndarray, noise_hu: float, seed: int, spacing_mm: float) -> np.ndarray:
    """The denoising input: ``add_ct_noise`` with its default correlation (0.7 mm)."""
    from .phantoms import add_ct_noise

    return add_ct_noise(clean_hu, noise_hu, seed, (spacing_mm,) * 3).astype(np.float32)


# --------------------------------------------------------------------------- measures
def window_clip(hu: np.ndarray, region: str) -> np.ndarray:
    lo, hi = preprocessing.window_bounds(region)
    return np.clip(np.asarray(hu, dtype=np.float32), lo, hi)


def windowed_psnr(pred: np.ndarray, truth: np.ndarray, region: str, mask: np.ndarray) -> float:
    """PSNR in HU of both images clipped to the region window, data range = window width,
    MSE over ``mask``."""
    lo, hi = preprocessing.window_bounds(region)
    return metrics.psnr(window_clip(pred, region), window_clip(truth, region), data_range=hi - lo, mask=mask)


def windowed_ssim(pred: np.ndarray, truth: np.ndarray, region: str, mask: np.ndarray) -> float:
    """3-D SSIM of both images clipped to the window (data range = width), averaged over ``mask``."""
    lo, hi = preprocessing.window_bounds(region)
    return metrics.ssim3d(window_clip(pred, region), window_clip(truth, region), data_range=hi - lo, mask=mask)


def _windowed_filter(noisy: np.ndarray, region: str, fn) -> np.ndarray:
    """Filter the window-clipped image (what the model sees); voxels outside the window keep
    the input, as the model's denoising does."""
    noisy = np.asarray(noisy, dtype=np.float32)
    out = np.asarray(fn(window_clip(noisy, region)), dtype=np.float32)
    return np.where(preprocessing.outside_window(noisy, region), noisy, out).astype(np.float32)


def gaussian_denoise(noisy: np.ndarray, region: str, sigma_vox: float) -> np.ndarray:
    """Isotropic Gaussian filter (sigma in voxels) of the window-clipped image."""
    from scipy import ndimage

    return _windowed_filter(noisy, region, lambda x: ndimage.gaussian_filter(x, float(sigma_vox), mode="nearest"))


def tune_gaussian_sigma(noisy: np.ndarray, clean: np.ndarray, region: str, mask: np.ndarray,
                        sigmas: Sequence[float] = GAUSSIAN_SIGMAS_VOX) -> tuple[float, float]:
    """The sigma of ``sigmas`` with the best windowed PSNR on a tuning pair: (sigma, psnr).
    Ties go to the smaller sigma."""
    best = None
    for s in sigmas:
        p = windowed_psnr(gaussian_denoise(noisy, region, s), clean, region, mask)
        if best is None or p > best[1]:
            best = (float(s), p)
    assert best is not None
    return best


def estimate_noise_sigma(hu: np.ndarray, region: str) -> tuple[float, str]:
    """Noise standard deviation in HU, blind: scikit-image's ``estimate_sigma`` (wavelet MAD,
    needs PyWavelets) on the unclipped image; without PyWavelets the library's own flat-region
    estimator (the one the denoising task uses). Returns (sigma, estimator name)."""
    hu = np.asarray(hu, dtype=np.float32)
    try:
        from skimage.restoration import estimate_sigma

        return float(estimate_sigma(hu)), "skimage.estimate_sigma"
    except ImportError:
        from .tasks.denoise import estimate_noise

        lo, hi = preprocessing.window_bounds(region)
        return float(estimate_noise(preprocessing.hu_to_unit(hu, region)) * (hi - lo) / 2.0), "flat-region MAD"


def nlm_denoise(noisy: np.ndarray, region: str, sigma_hu: float, patch_size: int = NLM_PATCH_SIZE,
                patch_distance: int = NLM_PATCH_DISTANCE, h_factor: float = NLM_H_FACTOR) -> np.ndarray:
    """3-D non-local means (scikit-image, fast mode) of the window-clipped image with the noise
    ``sigma`` given and ``h = h_factor * sigma`` (scikit-image: h of sigma or slightly less; its
    gallery uses 0.6 sigma for the fast mode with sigma given)."""
    from skimage.restoration import denoise_nl_means

    s = max(float(sigma_hu), 1e-6)
    return _windowed_filter(noisy, region, lambda x: denoise_nl_means(
        x, patch_size=patch_size, patch_distance=patch_distance, h=h_factor * s, sigma=s, fast_mode=True,
        preserve_range=True, channel_axis=None))


def bm4d_available() -> Optional[str]:
    """The installed ``bm4d`` version, or None."""
    try:
        import bm4d  # noqa: F401
    except Exception:  # absent, or its binary library does not load on this platform
        return None
    try:
        from importlib.metadata import version

        return version("bm4d")
    except Exception:
        return "unknown"


def bm4d_denoise(noisy: np.ndarray, region: str, sigma_hu: float) -> np.ndarray:
    """BM4D (optional ``bm4d`` package, white-noise profile) of the window-clipped image."""
    import bm4d

    s = max(float(sigma_hu), 1e-6)
    return _windowed_filter(noisy, region, lambda x: bm4d.bm4d(x.astype(np.float64), s))


def organ_deviation_map(hu: np.ndarray, labels: np.ndarray, region: str, body: np.ndarray,
                        smoothing_vox: float = 1.0) -> np.ndarray:
    """Anomaly baseline: |u - median of u over the voxel's label| in model units (window
    clipped, [-1, 1]), Gaussian-smoothed by ``smoothing_vox`` (the model's default: one voxel),
    zero outside ``body``. It uses the same label map the model is given."""
    from scipy import ndimage

    u = preprocessing.hu_to_unit(hu, region).astype(np.float64)
    labels = np.asarray(labels).astype(np.int64)
    body = np.asarray(body, dtype=bool)
    values = np.unique(labels[body])
    values = values[values > 0]
    med = np.zeros(int(labels.max()) + 1 if labels.size else 1, dtype=np.float64)
    if values.size:
        med[values] = ndimage.median(u, labels=np.where(body, labels, 0), index=values)
    dev = np.where(body, np.abs(u - med[labels]), 0.0)  # outside the body: no evidence either way
    dev = ndimage.gaussian_filter(dev, float(smoothing_vox)) if smoothing_vox > 0 else dev
    return np.where(body, dev, 0.0).astype(np.float32)


def threshold_anomaly_map(amap: np.ndarray, body: np.ndarray, min_size: int = 3,
                          threshold: float = 4.0) -> tuple[np.ndarray, float]:
    """The anomaly task's own mask rule on a (z-scored) map: above ``threshold`` inside the body,
    components of fewer than ``min_size`` voxels dropped. Returns (mask, threshold)."""
    from scipy import ndimage

    mask = (amap > threshold) & body
    if min_size > 1 and mask.any():
        lab, k = ndimage.label(mask)
        sizes = np.bincount(lab.ravel())
        mask = np.isin(lab, np.nonzero(sizes >= min_size)[0][1:]) if k else mask
    return mask, float(threshold)


def zscore_by_tissue(amap: np.ndarray, labels: np.ndarray, label_names, body: np.ndarray) -> np.ndarray:
    """The anomaly task's normalisation: robust z-score within each anatomy group."""
    from .tasks.anomaly import group_zscore

    groups, _ = anatomy.group_map(labels, label_names)
    return group_zscore(amap, groups, body)


def anomaly_volume_score(amap: np.ndarray, body: np.ndarray) -> float:
    """The anomaly task's volume score: the 0.999 quantile of the map inside the body."""
    inside = amap[body] if body.any() else amap.ravel()
    return float(np.quantile(inside, 0.999)) if inside.size else 0.0


def main_groups(groups: np.ndarray, body: np.ndarray, min_fraction: float = MIN_GROUP_FRACTION) -> list[int]:
    """Group values (anatomy.group_map: 1 body tissue, 2 + g organ groups) that cover at least
    ``min_fraction`` of the body and 10 voxels."""
    n_body = int(body.sum())
    out = []
    for v in np.unique(groups[body]):
        n = int(((groups == v) & body).sum())
        if v >= 1 and n >= max(10, min_fraction * n_body):
            out.append(int(v))
    return out


def group_name(v: int) -> str:
    from .anatomy import GROUP_NAMES

    return "body tissue" if v == 1 else GROUP_NAMES[v - 2]


def class_means(hu: np.ndarray, groups: np.ndarray, body: np.ndarray, region: str,
                classes: Sequence[int]) -> dict[int, float]:
    """Mean window-clipped HU of each class inside the body."""
    c = window_clip(hu, region)
    return {int(v): float(c[(groups == v) & body].mean()) for v in classes if ((groups == v) & body).any()}


def nearest_mean_segmentation(hu: np.ndarray, means: dict[int, float], body: np.ndarray, region: str) -> np.ndarray:
    """Each body voxel gets the class whose mean (window-clipped HU) is nearest to its own
    clipped HU (ties: the first class in ``means``); 0 outside the body."""
    keys = np.array(list(means), dtype=np.int16)
    centres = np.array([means[int(k)] for k in keys], dtype=np.float64)
    c = window_clip(hu, region).astype(np.float64)
    idx = np.argmin(np.abs(c[..., None] - centres), axis=-1)
    return np.where(body, keys[idx], 0).astype(np.int16)


def organ_ellipsoid_mask(labels: np.ndarray, spacing_mm: float, candidates: Sequence[int], radius_mm: float,
                         semi_scale: Sequence[float] = (1.0, 0.8, 1.2)) -> tuple[np.ndarray, int]:
    """A small ellipsoid deep inside one of the ``candidates`` organ labels (the one with the
    deepest interior voxel), clipped to that organ so it lies in its tissue only.

    The centre is the organ's deepest voxel; the semi-axes (k, j, i) are ``semi_scale`` times
    ``min(radius_mm, 0.7 * depth)`` (at least one voxel). Returns (mask, organ label)."""
    from scipy import ndimage

    best = None
    for lab in candidates:
        organ = labels == lab
        if not organ.any():
            continue
        depth = ndimage.distance_transform_edt(organ, sampling=spacing_mm)
        c = np.unravel_index(int(np.argmax(depth)), depth.shape)
        if best is None or depth[c] > best[2]:
            best = (int(lab), c, float(depth[c]), organ)
    if best is None:
        raise ValueError("none of the candidate organs is present")
    lab, c, d, organ = best
    r = max(min(float(radius_mm), 0.7 * d), float(spacing_mm))
    kk, jj, ii = np.ogrid[tuple(slice(0, n) for n in labels.shape)]
    semi = [r * s for s in semi_scale]
    q = sum(((g - ci) * spacing_mm / a) ** 2 for g, ci, a in zip((kk, jj, ii), c, semi))
    mask = (q <= 1.0) & organ
    mask[c] = True
    return mask, lab


def organ_ring(mask: np.ndarray, organ: np.ndarray, spacing_mm: float, width_mm: float) -> np.ndarray:
    """Organ voxels outside ``mask`` within ``width_mm`` of it."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    return organ & ~mask & (dist <= width_mm)


def near_mask(mask: np.ndarray, spacing_mm: float, width_mm: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.distance_transform_edt(~mask, sampling=spacing_mm) <= width_mm


def lesion_measures(hu: np.ndarray, mask: np.ndarray, ring: np.ndarray, near: np.ndarray) -> dict:
    """Contrast (mean in mask - mean of the organ ring), spreads, and the Dice against ``mask``
    of a threshold segmentation: voxels of ``near`` (the mask and its surroundings) whose HU
    differs from the ring mean in the contrast's direction by more than half the contrast."""
    hu = np.asarray(hu, dtype=np.float64)
    ring_mean = float(hu[ring].mean()) if ring.any() else float("nan")
    contrast = float(hu[mask].mean() - ring_mean)
    if math.isfinite(contrast) and contrast != 0.0:
        seg = near & (np.sign(contrast) * (hu - ring_mean) > abs(contrast) / 2.0)
    else:
        seg = np.zeros_like(mask)
    return {"contrast_hu": contrast, "std_in_hu": float(hu[mask].std()),
            "std_ring_hu": float(hu[ring].std()) if ring.any() else float("nan"),
            "threshold_dice": metrics.dice(seg, mask)}


def outside_identical_fraction(out: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of voxels outside ``mask`` whose float32 bits are identical in both images."""
    a = np.ascontiguousarray(out, dtype=np.float32).view(np.uint32)
    b = np.ascontiguousarray(ref, dtype=np.float32).view(np.uint32)
    outside = ~np.asarray(mask, dtype=bool)
    if not outside.any():
        return 1.0
    return float(np.mean(a[outside] == b[outside]))


def _safe_auroc(scores, labels) -> Optional[float]:
    try:
        return metrics.auroc(scores, labels)
    except ValueError:
        return None


# --------------------------------------------------------------------------- collection
class _Rows:
    """Per (task, condition, method, metric): the values of every case, in insertion order."""

    def __init__(self) -> None:
        self.data: "OrderedDict[tuple, dict]" = OrderedDict()

    def add(self, task: str, condition: str, method: str, metric: str, value, case: str,
            n: Optional[int] = None) -> None:
        """``n``: how many cases one pooled value stands for (e.g. a volume AUROC)."""
        key = (task, condition, method, metric)
        rec = self.data.setdefault(key, {"values": [], "cases": [], "n": None})
        rec["values"].append(None if value is None else float(value))
        rec["cases"].append(case)
        if n is not None:
            rec["n"] = int(n)

    def rows(self) -> list[dict]:
        out = []
        for (task, condition, method, metric), rec in self.data.items():
            vals = [v for v in rec["values"] if v is not None and math.isfinite(v)]
            n = len(vals)
            mean = float(np.mean(vals)) if n else None
            std = float(np.std(vals, ddof=1)) if n >= 2 else None
            if rec["n"] is not None and n:
                n = rec["n"]
            out.append({"task": task, "condition": condition, "method": method, "metric": metric,
                        "mean": mean, "std": std, "n": n, "values": rec["values"], "cases": rec["cases"]})
        return out


# --------------------------------------------------------------------------- model resolution
def resolve_controlnet(name, task: str, base_dir: Path) -> tuple[Optional[Path], Optional[str]]:
    """The ControlNet directory for ``task`` ("superres" or "lesion"), or (None, why skipped).

    A ControlNet named by the caller that cannot be used is an error (ValueError); a missing
    or unusable *default* one only skips its rows, with the reason."""
    from . import weights
    from .checkpoint import read_config, sha256_file

    explicit = name is not None
    what = f"{task} ControlNet"
    if not explicit:
        try:
            name = weights.default_model_id("controlnet", task)
        except (ValueError, OSError) as e:
            return None, f"no {what}: the model registry cannot be read ({e})"
        if name is None:
            return None, f"no {what} given or registered"
    try:
        path = weights.resolve_model(name, kind="controlnet", task=task)
        cfg = read_config(path)
        if cfg.get("kind") != "controlnet" or cfg.get("task") != task:
            raise ValueError(f"{path} is not a {what} (kind {cfg.get('kind')!r}, task {cfg.get('task')!r})")
        want = cfg.get("base_sha256") or ""
        if want and want != sha256_file(Path(base_dir) / "model.safetensors"):
            raise ValueError(f"the {what} in {path} was trained on another base model than {base_dir}")
    except (ValueError, OSError) as e:
        if explicit:
            raise ValueError(f"{what} {name!s}: {e}") from e
        return None, f"default {what} {name!r} not usable: {e}"
    return Path(path), None


# --------------------------------------------------------------------------- the benchmark
def run_benchmark(model=None, *, superres_controlnet=None, lesion_controlnet=None,
                  options: Optional[BenchmarkOptions] = None, log: Optional[Callable[[str], None]] = None) -> dict:
    """Run the benchmark; returns ``{"meta", "rows", "notes", "captions"}`` (JSON-serialisable
    after :func:`to_jsonable`).

    Args:
        model: foundation model directory or registry id (None: the registry's default).
        superres_controlnet / lesion_controlnet: ControlNet directory or id (None: the
            registered default for the task; its rows are skipped with a note when none is).
        options: :class:`BenchmarkOptions` (default: 3 cases, every section).
        log: progress lines (default: stderr when ``options.progress``).
    """
    from .checkpoint import read_config
    from .tasks.common import resolve_model_dir

    opts = options or BenchmarkOptions()
    if log is None:
        log = (lambda s: print(f"[benchmark] {s}", file=sys.stderr, flush=True)) if opts.progress else (lambda s: None)
    t_start = time.monotonic()
    base_dir = resolve_model_dir(model, kind="base")
    spacing = float(read_config(base_dir)["spacing_mm"])
    shape = phantom_shape(opts.fov_mm, spacing)
    if min(shape) < 7:
        raise ValueError(f"phantoms of {shape} voxels (k, j, i) are too small for the measures (at least 7 per axis); "
                         f"use a larger field of view than {opts.fov_mm} mm at {spacing} mm")
    notes: list[str] = []
    cn: dict[str, Optional[Path]] = {}
    need = {"superres": "superres" in opts.tasks, "lesion": bool({"inpaint", "lesion"} & set(opts.tasks))}
    for task, given in (("superres", superres_controlnet), ("lesion", lesion_controlnet)):
        cn[task] = None
        if need[task]:
            cn[task], why = resolve_controlnet(given, task, base_dir)
            if why:
                sections = "super-resolution" if task == "superres" else "inpainting and lesion generation"
                notes.append(f"{sections} skipped: {why} (pass --{task}-controlnet DIR|id)")
    ctx = _Context(opts, base_dir, spacing, shape, cn, _Rows(), notes, log)
    meta = {
        "model": str(Path(base_dir).resolve()),
        "superres_controlnet": str(cn["superres"].resolve()) if cn["superres"] else None,
        "lesion_controlnet": str(cn["lesion"].resolve()) if cn["lesion"] else None, "spacing_mm": spacing,
        "shape_kji": list(shape), "fov_mm": list(opts.fov_mm), "cases": int(opts.cases),
        "seed_start": int(opts.seed_start), "regions": [case_region(i) for i in range(opts.cases)],
        "tasks": list(opts.tasks), "steps": {t: opts.steps.get(t, "task default") for t in opts.tasks},
        "device": opts.device, "noise_levels_hu": list(opts.noise_levels_hu),
        "phantom_noise_hu": PHANTOM_NOISE_HU, "seed_scheme": (
            f"case i: phantom seed_start + {SEEDS_PER_CASE} i, lesion phantom + 1, denoising noise + 2 + level; "
            f"tuning phantoms seed_start + {TUNE_SEED_OFFSET} + {SEEDS_PER_CASE} * region index"),
    }
    ctx.meta = meta
    log(f"model {base_dir} ({spacing:g} mm), phantoms {shape[::-1]} voxels (i, j, k), {opts.cases} case(s), "
        f"sections: {', '.join(opts.tasks)}")
    for task in opts.tasks:
        if task in ("superres",) and cn["superres"] is None:
            continue
        if task in ("inpaint", "lesion") and cn["lesion"] is None:
            continue
        t0 = time.monotonic()
        getattr(ctx, f"run_{task}")()
        log(f"{task} done in {time.monotonic() - t0:.1f} s")
    meta["seconds_total"] = time.monotonic() - t_start
    return {"meta": meta, "rows": ctx.rows.rows(), "notes": notes, "captions": ctx.captions()}


class _Context:
    def __init__(self, opts: BenchmarkOptions, base_dir: Path, spacing: float, shape, cn, rows: _Rows,
                 notes: list, log):
        self.opts, self.base_dir, self.spacing, self.shape = opts, base_dir, spacing, shape
        self.cn, self.rows, self.notes, self.log = cn, rows, notes, log
        self.meta: dict = {}
        self._phantoms: dict = {}
        self._caption_extra: dict[str, str] = {}
        try:
            import skimage.metrics  # noqa: F401
            self.have_skimage = True
        except ImportError:
            self.have_skimage = False
            if {"denoise", "superres"} & set(opts.tasks):
                notes.append("SSIM and non-local means skipped: scikit-image is not installed "
                             "(pip install scikit-image, or the 'benchmark' extra)")

    def image_quality(self, task, cond, method, img, truth, region, body, case) -> None:
        self.add(task, cond, method, "psnr_db", windowed_psnr(img, truth, region, body), case)
        if self.have_skimage:
            self.add(task, cond, method, "ssim", windowed_ssim(img, truth, region, body), case)

    # ---------------------------------------------------------------- helpers
    def phantom(self, i: int, kind: str = "phantom"):
        key = (i, kind)
        if key not in self._phantoms:
            seeds = case_seeds(self.opts.seed_start, i)
            lesions = ANOMALY_LESIONS if kind == "lesion_phantom" else 0
            self._phantoms[key] = make_case_phantom(case_region(i), self.shape, self.spacing, seeds[kind],
                                                    lesions=lesions)
        return self._phantoms[key]

    def case_name(self, i: int, kind: str = "phantom") -> str:
        return f"{case_region(i)}-{case_seeds(self.opts.seed_start, i)[kind]}"

    def params(self, task: str) -> dict:
        return {"steps": self.opts.steps[task]} if task in self.opts.steps else {}

    def run_model(self, task: str, request, controlnet=None):
        from .tasks import run_task

        t0 = time.monotonic()
        res = run_task(RUN_TASK_NAME[task], request, self.base_dir, controlnet=controlnet, device=self.opts.device)
        return res, time.monotonic() - t0

    def add(self, task, condition, method, metric, value, case, n=None):
        self.rows.add(task, condition, method, metric, value, case, n)

    def add_all(self, task, condition, method, case, **values) -> None:
        """One row per metric=value, in the order given."""
        for metric, value in values.items():
            self.add(task, condition, method, metric, value, case)

    def captions(self) -> dict:
        o = self.opts
        levels = ", ".join(f"{n:g}" for n in o.noise_levels_hu)
        return {
            "denoise": (
                f"Clean phantom + add_ct_noise ({levels} HU, 0.7 mm correlation). PSNR and SSIM in HU with both "
                "images clipped to the region window, data range = window width, inside the body (label map > 0). "
                "Baselines filter the window-clipped image and keep voxels outside the window, as the model does; "
                "Gaussian sigma tuned per region and level on a separate tuning phantom; NLM and BM4D get the noise "
                "sigma estimated from the image (blind, like the model; the 'noise estimate' column shows it against "
                "the true level: wavelet estimates miss correlated noise on fine grids). Higher is better." + self._caption_extra.get("denoise", "")),
            "anomaly": (
                f"Phantoms with {ANOMALY_LESIONS} inserted lesions and the healthy phantoms of the same cases "
                f"({PHANTOM_NOISE_HU:g} HU noise). Model: partial diffusion with the phantom's label map as the "
                "anatomy condition (as a TotalSegmentator result would be). Baseline: |HU - median HU of the voxel's "
                "label| in window units, smoothed by 1 voxel (same label map). Both maps are robust z-scores within "
                "each anatomy group; mask = z > 4 inside the body, volume score = 0.999 quantile. Voxel AUROC and Dice on lesion cases inside the body; volume "
                "AUROC pools lesion (positive) and healthy (negative) volumes; flagged = mask volume on healthy "
                "phantoms (lower is better)."),
            "synthesis": (
                "Synthesis conditioned on the phantom's label map. Per organ group present (>= 0.5% of the body): "
                "|mean HU in the group mask - the real phantom's mean| (window-clipped HU, lower is better) and the "
                "Dice against the conditioning mask of a nearest-mean threshold segmentation (each body voxel gets "
                "the group whose real mean HU is nearest; a stand-in for running a segmenter). 'real phantom' is "
                "the ceiling of that segmentation on these phantoms; 'uniform' (body mean) and 'noise' (body mean "
                "+- body std) are trivial images."),
            "superres": (
                "Thick slices simulated from the clean thin-slice phantom by block averages with the ControlNet's "
                "trained factor; output vs the thin-slice truth, PSNR / SSIM as for denoising (window-clipped HU, "
                "inside the body). Interpolations: preprocessing.resample_to_grid onto the thin grid."
                + self._caption_extra.get("superres", "")),
            "inpaint": (
                f"Mask: an ellipsoid deep inside a healthy organ (liver, spleen, kidney, lung or brain) of the "
                f"phantom ({PHANTOM_NOISE_HU:g} HU noise). Outside identical: fraction of voxels outside the mask "
                "bit-identical to the input (must be 1). Ring: organ voxels within one radius around the mask. "
                "Healthy content should match the ring (difference ~0, similar std)."),
            "lesion": (
                "Same kind of mask as for inpainting. Contrast = mean HU in the mask - mean of the organ ring; "
                "threshold Dice: voxels near the mask that differ from the ring mean by more than half the contrast "
                "(in its direction) vs the mask. 'phantom lesions' measures the phantoms' own inserted lesions the "
                "same way (a reference for what a lesion looks like here); 'input' is the unchanged image."),
        }

    # ---------------------------------------------------------------- 1. denoising
    def run_denoise(self) -> None:
        from .volume import Volume
        from .tasks import TaskRequest

        o = self.opts
        nlm_ok = o.nlm and self.have_skimage
        bm4d_version = bm4d_available() if o.bm4d else None
        if o.bm4d and bm4d_version is None:
            self.notes.append("BM4D skipped: the optional 'bm4d' package is not installed (pip install bm4d; "
                              "free for non-commercial use only)")
        elif not o.bm4d:
            self.notes.append("BM4D not run (disabled)")
        self.meta["bm4d_version"] = bm4d_version
        tuned: dict = {}
        estimators = set()
        for i in range(o.cases):
            region = case_region(i)
            ph = self.phantom(i)
            body = ph.labels > 0
            seeds = case_seeds(o.seed_start, i)
            case = self.case_name(i)
            for j, level in enumerate(o.noise_levels_hu):
                cond = f"{level:g} HU"
                noisy = noisy_image(ph.clean_hu, level, seeds["noise"][j], self.spacing)
                if (region, level) not in tuned:
                    tuned[(region, level)] = self._tune(region, j, level)
                sigma_g = tuned[(region, level)]
                outs = [("noisy input", noisy, 0.0)]
                t0 = time.monotonic()
                outs.append(("Gaussian (tuned sigma)", gaussian_denoise(noisy, region, sigma_g),
                             time.monotonic() - t0))
                if nlm_ok or bm4d_version:
                    sig, how = estimate_noise_sigma(noisy, region)
                    estimators.add(how)
                if nlm_ok:
                    t0 = time.monotonic()
                    outs.append(("non-local means (3-D)", nlm_denoise(noisy, region, sig), time.monotonic() - t0))
                if bm4d_version:
                    t0 = time.monotonic()
                    outs.append(("BM4D", bm4d_denoise(noisy, region, sig), time.monotonic() - t0))
                res, secs = self.run_model("denoise", TaskRequest(image=Volume(noisy, ph.ijk_to_ras), region=region,
                                                                  params=self.params("denoise")))
                outs.append(("model (DiffPIR)", res.volumes["denoised"].array, secs))
                for method, img, s in outs:
                    self.image_quality("denoise", cond, method, img, ph.clean_hu, region, body, case)
                    if method != "noisy input":
                        self.add("denoise", cond, method, "seconds", s, case)
                    if method in ("non-local means (3-D)", "BM4D"):
                        self.add("denoise", cond, method, "sigma_est_hu", sig, case)
                self.add("denoise", cond, "model (DiffPIR)", "sigma_est_hu", res.scores["noise_level_hu"], case)
                self.log(f"denoise case {i + 1}/{o.cases} ({case}) {cond}: model {secs:.1f} s")
        self.meta["gaussian_sigma_vox"] = {f"{r} {lv:g} HU": s for (r, lv), s in tuned.items()}
        self.meta["nlm"] = {"patch_size": NLM_PATCH_SIZE, "patch_distance": NLM_PATCH_DISTANCE,
                            "h": f"{NLM_H_FACTOR} * sigma", "fast_mode": True, "sigma_estimator": sorted(estimators)}
        sig_txt = ", ".join(f"{k}: {v:g}" for k, v in self.meta["gaussian_sigma_vox"].items())
        self._caption_extra["denoise"] = (f" Tuned Gaussian sigma (voxels): {sig_txt}. NLM: patch "
                                          f"{NLM_PATCH_SIZE}, distance {NLM_PATCH_DISTANCE}, h = {NLM_H_FACTOR} sigma; "
                                          f"sigma from {', '.join(sorted(estimators)) or '-'}.")

    def _tune(self, region: str, j: int, level: float) -> float:
        seeds = tuning_seeds(self.opts.seed_start, region)
        key = ("tune", region)
        if key not in self._phantoms:
            self._phantoms[key] = make_case_phantom(region, self.shape, self.spacing, seeds["phantom"], noise_hu=0.0)
        ph = self._phantoms[key]
        noisy = noisy_image(ph.clean_hu, level, seeds["noise"][j], self.spacing)
        sigma, _ = tune_gaussian_sigma(noisy, ph.clean_hu, region, ph.labels > 0)
        self.log(f"Gaussian sigma for {region} at {level:g} HU: {sigma:g} voxel (tuning seed {seeds['phantom']})")
        return sigma

    # ---------------------------------------------------------------- 2. anomaly detection
    def run_anomaly(self) -> None:
        from .tasks import TaskRequest

        o = self.opts
        scores: dict[str, list] = {"model (partial diffusion)": [], "organ-median deviation": []}
        truth: list[bool] = []
        for i in range(o.cases):
            region = case_region(i)
            for kind in ("lesion_phantom", "phantom"):
                try:
                    ph = self.phantom(i, kind)
                except ValueError as e:  # no organ to hold a lesion in this field of view
                    self.notes.append(f"anomaly: no lesion phantom for case {i + 1} ({e})")
                    continue
                has_lesion = bool(ph.lesion_mask.any())
                if kind == "lesion_phantom" and not has_lesion:
                    self.notes.append(f"anomaly: lesion phantom {self.case_name(i, kind)} has no lesion voxel; skipped")
                    continue
                body = ph.labels > 0
                case = self.case_name(i, kind)
                res, secs = self.run_model("anomaly", TaskRequest(
                    image=ph.volume(), region=region, anatomy=ph.label_volume(), anatomy_names=ph.label_names,
                    params=self.params("anomaly")))
                t0 = time.monotonic()
                bmap = zscore_by_tissue(organ_deviation_map(ph.hu, ph.labels, region, body), ph.labels,
                                        ph.label_names, body)
                bmask, _ = threshold_anomaly_map(bmap, body)
                bsecs = time.monotonic() - t0
                results = {
                    "model (partial diffusion)": (res.volumes["anomaly_map"].array, res.segmentations["anomaly"].array,
                                                  res.scores["anomaly_score"], secs),
                    "organ-median deviation": (bmap, bmask, anomaly_volume_score(bmap, body), bsecs),
                }
                truth.append(has_lesion)
                cond = "lesion cases" if has_lesion else "healthy cases"
                for method, (amap, mask, score, s) in results.items():
                    scores[method].append(score)
                    if has_lesion:
                        self.add("anomaly", cond, method, "voxel_auroc",
                                 _safe_auroc(amap[body], ph.lesion_mask[body]), case)
                        self.add("anomaly", cond, method, "dice", metrics.dice(mask, ph.lesion_mask), case)
                    else:
                        self.add("anomaly", cond, method, "flagged_ml",
                                 float(np.asarray(mask).sum()) * self.spacing ** 3 / 1000.0, case)
                    self.add("anomaly", cond, method, "seconds", s, case)
                self.log(f"anomaly case {i + 1}/{o.cases} ({case}): model {secs:.1f} s")
        for method, sc in scores.items():
            auc = _safe_auroc(np.asarray(sc, dtype=np.float64), np.asarray(truth, dtype=bool)) if sc else None
            if auc is None:
                self.notes.append(f"anomaly: volume AUROC of {method} undefined (needs lesion and healthy volumes)")
            self.add("anomaly", "all volumes", method, "volume_auroc", auc, f"{len(sc)} volumes", n=len(sc))

    # ---------------------------------------------------------------- 3. synthesis
    def run_synthesis(self) -> None:
        from . import anatomy
        from .tasks import TaskRequest

        o = self.opts
        for i in range(o.cases):
            region = case_region(i)
            ph = self.phantom(i)
            case = self.case_name(i)
            body = ph.labels > 0
            groups, _ = anatomy.group_map(ph.labels, ph.label_names)
            res, secs = self.run_model("synthesis", TaskRequest(
                anatomy=ph.label_volume(), anatomy_names=ph.label_names, region=region,
                params=self.params("synthesis")))
            synth = res.volumes["synthetic"].array
            present = [int(v) for v in np.unique(groups[body]) if v >= 1]
            means = class_means(ph.clean_hu, groups, body, region, present)
            clip_real = window_clip(ph.clean_hu, region)
            body_mean, body_std = float(clip_real[body].mean()), float(clip_real[body].std())
            rng = np.random.default_rng([int(case_seeds(o.seed_start, i)["phantom"]), 99])
            images = {
                "model": synth,
                "real phantom (ceiling)": ph.hu,
                "uniform (body mean)": np.full(ph.hu.shape, body_mean, np.float32),
                "noise (body mean +- std)": (body_mean + body_std * rng.standard_normal(ph.hu.shape)
                                             ).astype(np.float32),
            }
            report = main_groups(groups, body)
            for method, img in images.items():
                seg = nearest_mean_segmentation(img, means, body, region)
                clip = window_clip(img, region)
                dices = []
                for v in report:
                    m = (groups == v) & body
                    name = group_name(v)
                    self.add("synthesis", name, method, "mean_hu_abs_error", abs(float(clip[m].mean()) - means[v]),
                             case)
                    d = metrics.dice(seg == v, m)
                    dices.append(d)
                    self.add("synthesis", name, method, "threshold_dice", d, case)
                self.add("synthesis", "all groups (mean)", method, "threshold_dice",
                         float(np.mean(dices)) if dices else None, case)
            self.add("synthesis", "all groups (mean)", "model", "seconds", secs, case)
            self.log(f"synthesis case {i + 1}/{o.cases} ({case}): model {secs:.1f} s")

    # ---------------------------------------------------------------- 4. super-resolution
    def run_superres(self) -> None:
        import torch

        from .checkpoint import read_config
        from .finetune import thick_slices
        from .geometry import regrid
        from .tasks import TaskRequest
        from .volume import Volume

        o = self.opts
        raw = read_config(self.cn["superres"]).get("params", {}).get("factor")
        try:
            factor = tuple(int(f) for f in raw)
            if len(factor) != 3 or min(factor) < 1 or any(float(a) != float(b) for a, b in zip(raw, factor)):
                raise ValueError
        except (TypeError, ValueError):
            self.notes.append(f"super-resolution skipped: the ControlNet's factor {raw!r} is not three integers")
            return
        self.meta["superres_factor"] = list(factor)
        cond = "x".join(str(f) for f in factor) + " (k, j, i)"
        self._caption_extra["superres"] = f" Factor {cond}."
        for i in range(o.cases):
            region = case_region(i)
            ph = self.phantom(i)
            case = self.case_name(i)
            n = [s // f for s, f in zip(ph.clean_hu.shape, factor)]
            if min(n) < 1:
                self.notes.append(f"super-resolution: phantom smaller than one block of {factor}; skipped")
                return
            hr = np.ascontiguousarray(ph.clean_hu[: n[0] * factor[0], : n[1] * factor[1], : n[2] * factor[2]])
            body = ph.labels[: hr.shape[0], : hr.shape[1], : hr.shape[2]] > 0
            lr = thick_slices(torch.from_numpy(hr), factor).numpy().astype(np.float32)
            lr_m, _ = regrid(ph.ijk_to_ras, hr.shape, np.full(3, self.spacing) * np.asarray(factor))
            res, secs = self.run_model("superres", TaskRequest(image=Volume(lr, lr_m), region=region,
                                                               params=self.params("superres")),
                                       controlnet=self.cn["superres"])
            sr = res.volumes["superres"]
            out = sr.array
            if sr.shape != hr.shape or not np.allclose(sr.ijk_to_ras, ph.ijk_to_ras, atol=1e-6):
                out = preprocessing.resample_to_grid(out, sr.ijk_to_ras, hr.shape, ph.ijk_to_ras, order=1)
            outs = [("model (ControlNet)", out, secs)]
            for method, order in (("trilinear", 1), ("cubic", 3)):
                t0 = time.monotonic()
                img = preprocessing.resample_to_grid(lr, lr_m, hr.shape, ph.ijk_to_ras, order=order)
                outs.append((method, img, time.monotonic() - t0))
            for method, img, s in outs:
                self.image_quality("superres", cond, method, img, hr, region, body, case)
                self.add("superres", cond, method, "seconds", s, case)
            self.log(f"superres case {i + 1}/{o.cases} ({case}): model {secs:.1f} s")

    # ---------------------------------------------------------------- 5./6. local tasks
    def local_mask(self, i: int):
        """(phantom, mask, organ mask, ring, near, radius_mm) for case ``i``, cached."""
        key = (i, "local")
        if key not in self._phantoms:
            from .phantoms import LESION_ORGANS

            ph = self.phantom(i)
            names = {n: v for v, n in ph.label_names.items()}
            candidates = [names[n] for n in LESION_ORGANS[ph.region] if n in names]
            if not candidates:
                candidates = [v for v, n in ph.label_names.items() if v != 255 and not _is_bone(n)]
            fov_inplane = min(self.opts.fov_mm[1], self.opts.fov_mm[2])
            try:
                mask, lab = organ_ellipsoid_mask(ph.labels, self.spacing, candidates, radius_mm=0.05 * fov_inplane)
            except ValueError:
                self.notes.append(f"no organ to place a mask in for case {self.case_name(i)}: inpainting and "
                                  "lesion generation skip it")
                self._phantoms[key] = None
                return None
            organ = ph.labels == lab
            r_mm = max(float((3 * mask.sum() / (4 * np.pi)) ** (1 / 3)) * self.spacing, 2 * self.spacing)
            ring = organ_ring(mask, organ, self.spacing, r_mm)
            near = near_mask(mask, self.spacing, r_mm)
            self._phantoms[key] = (ph, mask, organ, ring, near, ph.label_names[lab])
        return self._phantoms[key]

    def local_cases(self):
        """(case index, phantom, mask, ring, near, organ name) for each case that has a local mask."""
        for i in range(self.opts.cases):
            local = self.local_mask(i)
            if local is not None:
                ph, mask, _organ, ring, near, organ_name = local
                yield i, ph, mask, ring, near, organ_name

    def run_local_task(self, task: str, ph, mask, params: dict):
        """Run a mask task (inpaint / lesion) on a phantom with the lesion ControlNet."""
        from .tasks import TaskRequest
        from .volume import Volume

        return self.run_model(task, TaskRequest(
            image=ph.volume(), region=ph.region, mask=Volume(mask.astype(np.uint8), ph.ijk_to_ras),
            params={**self.params(task), **params}), controlnet=self.cn["lesion"])

    def run_inpaint(self) -> None:
        o = self.opts
        for i, ph, mask, ring, near, organ_name in self.local_cases():
            case = self.case_name(i)
            base = lesion_measures(ph.hu, mask, ring, near)
            self.add_all("inpaint", "reference", "input (unchanged)", case, delta_mean_hu=base["contrast_hu"],
                         std_in_hu=base["std_in_hu"], std_ring_hu=base["std_ring_hu"])
            for content in ("healthy", "lesion"):
                res, secs = self.run_local_task("inpaint", ph, mask, {"content": content})
                out = res.volumes["inpainted"].array
                m = lesion_measures(out, mask, ring, near)
                self.add_all("inpaint", f"content={content}", "model (RePaint + lesion ControlNet)", case,
                             outside_identical=outside_identical_fraction(out, ph.hu, mask),
                             delta_mean_hu=m["contrast_hu"], std_in_hu=m["std_in_hu"], std_ring_hu=m["std_ring_hu"],
                             seconds=secs)
                self.log(f"inpaint case {i + 1}/{o.cases} ({case}, {organ_name}, {int(mask.sum())} voxels) "
                         f"{content}: {secs:.1f} s")

    def add_lesion_measures(self, condition: str, method: str, case: str, m: dict, **extra) -> None:
        self.add_all("lesion", condition, method, case, **extra, contrast_hu=m["contrast_hu"],
                     abs_contrast_hu=abs(m["contrast_hu"]), threshold_dice=m["threshold_dice"])

    def run_lesion(self) -> None:
        from scipy import ndimage

        o = self.opts
        for i, ph, mask, ring, near, organ_name in self.local_cases():
            case = self.case_name(i)
            res, secs = self.run_local_task("lesion", ph, mask, {})
            out = res.volumes["lesion"].array
            m = lesion_measures(out, mask, ring, near)
            self.add_lesion_measures("generated", "model (lesion ControlNet)", case, m,
                                     outside_identical=outside_identical_fraction(out, ph.hu, mask))
            self.add("lesion", "generated", "model (lesion ControlNet)", "seconds", secs, case)
            self.add_lesion_measures("reference", "input (no lesion)", case, lesion_measures(ph.hu, mask, ring, near))
            # the phantom's own inserted lesions, measured the same way
            try:
                lp = self.phantom(i, "lesion_phantom")
            except ValueError:
                lp = None
            if lp is not None and lp.lesion_mask.any():
                comp, k = ndimage.label(lp.lesion_mask)
                name = self.case_name(i, "lesion_phantom")
                for c in range(1, k + 1):
                    lm = comp == c
                    lab = int(np.bincount(lp.labels[lm]).argmax())
                    r_mm = max(float((3 * lm.sum() / (4 * np.pi)) ** (1 / 3)) * self.spacing, 2 * self.spacing)
                    ring_l = organ_ring(lm, (lp.labels == lab) & ~lp.lesion_mask, self.spacing, r_mm)
                    if not ring_l.any():
                        continue
                    ml = lesion_measures(lp.hu, lm, ring_l, near_mask(lm, self.spacing, r_mm))
                    self.add_lesion_measures("reference", "phantom lesions (each)", f"{name} lesion {c}", ml)
            self.log(f"lesion case {i + 1}/{o.cases} ({case}, {organ_name}, {int(mask.sum())} voxels): {secs:.1f} s")


def _is_bone(name: str) -> bool:
    from .anatomy import GROUP_NAMES, group_of

    g = group_of(name)
    return g is not None and g >= 2 and GROUP_NAMES[g - 2] == "bone"


# --------------------------------------------------------------------------- output
def _fmt(rec: Optional[dict]) -> str:
    if rec is None or rec["mean"] is None:
        return "-"
    dec = METRICS.get(rec["metric"], ("", 3))[1]
    mean = rec["mean"]
    text = f"{mean:.{dec}f}" if math.isfinite(mean) else str(mean)
    if rec["std"] is not None:
        text += f" ± {rec['std']:.{dec}f}"
    return text


def _section_tables(result: dict):
    """Per section: (task, header, body rows as lists of strings)."""
    rows = result["rows"]
    for task in ALL_TASKS:
        recs = [r for r in rows if r["task"] == task]
        if not recs:
            continue
        metric_keys = list(OrderedDict.fromkeys(r["metric"] for r in recs))
        metric_keys.sort(key=lambda m: (m == "seconds", list(METRICS).index(m) if m in METRICS else 99))
        keys = list(OrderedDict.fromkeys((r["condition"], r["method"]) for r in recs))
        cond_order = list(OrderedDict.fromkeys(c for c, _ in keys))
        cond_order.sort(key=lambda c: c.startswith("all "))  # pooled rows last; stable otherwise
        keys.sort(key=lambda k: cond_order.index(k[0]))  # stable: methods keep their order
        index = {(r["condition"], r["method"], r["metric"]): r for r in recs}
        header = ["condition", "method"] + [METRICS.get(m, (m, 3))[0] for m in metric_keys] + ["n"]
        body = []
        for cond, method in keys:
            cells = [index.get((cond, method, m)) for m in metric_keys]
            n = max((c["n"] for c in cells if c is not None and c["metric"] != "seconds"), default=0)
            body.append([cond, method] + [_fmt(c) for c in cells] + [str(n)])
        yield task, header, body


def format_table(result: dict) -> str:
    """The plain-text table printed by the CLI."""
    meta = result["meta"]
    lines = [f"MedDiffFM benchmark: model {meta['model']} ({meta['spacing_mm']:g} mm), {meta['cases']} held-out "
             f"phantom case(s) per task, seeds from {meta['seed_start']}, phantoms {tuple(meta['shape_kji'][::-1])} "
             f"voxels (i, j, k). Mean ± std over cases (std when n >= 2). Synthetic phantoms: not clinical results."]
    captions = result.get("captions", {})
    for task, header, body in _section_tables(result):
        widths = [max(len(h), *(len(r[c]) for r in body)) for c, h in enumerate(header)]
        lines.append("")
        lines.append(f"== {SECTION_TITLES[task]} ==")
        if captions.get(task):
            lines.append(_wrap(captions[task], 110))
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.append("  ".join("-" * w for w in widths))
        for r in body:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if result.get("notes"):
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"  - {n}" for n in result["notes"])
    return "\n".join(lines)


def format_markdown(result: dict) -> str:
    meta = result["meta"]
    out = ["# MedDiffFM benchmark", "",
           f"Model `{meta['model']}` ({meta['spacing_mm']:g} mm), {meta['cases']} held-out phantom case(s) per task "
           f"(seeds from {meta['seed_start']}; regions {', '.join(meta['regions'])}), phantoms "
           f"{' x '.join(str(s) for s in meta['shape_kji'][::-1])} voxels (i x j x k). Mean ± std over cases "
           "(std when n >= 2). Synthetic phantoms: these numbers are not clinical results."]
    captions = result.get("captions", {})
    for task, header, body in _section_tables(result):
        out += ["", f"## {SECTION_TITLES[task]}", ""]
        if captions.get(task):
            out += [captions[task], ""]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join("---" for _ in header) + "|")
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    if result.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(out) + "\n"


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def to_jsonable(obj):
    """NaN / inf -> None, numpy scalars -> Python, tuples -> lists (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(result: dict, path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(to_jsonable(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return p


def find_row(result: dict, task: str, condition: str, method: str, metric: str) -> Optional[dict]:
    """The row record of one (task, condition, method, metric), or None."""
    for r in result["rows"]:
        if (r["task"], r["condition"], r["method"], r["metric"]) == (task, condition, method, metric):
            return r
    return None


__all__ = ["ALL_TASKS", "BenchmarkOptions", "run_benchmark", "format_table", "format_markdown", "write_json",
           "to_jsonable", "find_row", "case_seeds", "case_region", "tuning_seeds", "phantom_shape",
           "noisy_image", "windowed_psnr", "windowed_ssim", "gaussian_denoise", "tune_gaussian_sigma",
           "nlm_denoise", "bm4d_denoise", "bm4d_available", "estimate_noise_sigma", "organ_deviation_map",
           "threshold_anomaly_map", "anomaly_volume_score", "nearest_mean_segmentation", "class_means",
           "main_groups", "organ_ellipsoid_mask", "organ_ring", "lesion_measures", "outside_identical_fraction",
           "parse_steps", "parse_tasks", "resolve_controlnet"]
