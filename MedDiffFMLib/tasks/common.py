"""The data path every task shares: input grid -> model grid -> sampler -> input grid."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import anatomy, preprocessing
from ..checkpoint import load_base, load_controlnet
from ..networks import REGION_INDEX, NoisePredictor
from ..sampling import PatchSampler, SamplerOptions
from ..volume import Volume
from .base import TaskRequest, check_image


def resolve_device(device: str = "auto", backend: str = "torch") -> torch.device:
    """'auto' -> the first CUDA GPU when there is one, else the CPU; 'cuda[:N]' or 'cpu' as given.
    With the onnx backend: where the sampler's tensors live (see ``onnx_backend.sampler_device``)."""
    if backend == "onnx":
        from ..onnx_backend import sampler_device

        return sampler_device(device)
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    if device == "gpu":
        return torch.device("cuda")
    return torch.device(device)


def resolve_model_dir(model: Optional[str | os.PathLike], kind: str = "base", task: Optional[str] = None) -> Path:
    """A model directory from a path or a registry id (None = the default for ``kind``/``task``)."""
    from .. import weights

    return Path(weights.resolve_model(model, kind=kind, task=task))


_CACHE: dict[tuple, NoisePredictor] = {}
_CACHE_LOCK = threading.Lock()


def load_predictor(model_dir: Path, controlnet_dir: Optional[Path], device: torch.device, backend: str = "torch",
                   requested_device: str = "auto") -> NoisePredictor:
    """Load (or reuse, for batch loops) the base model and optional ControlNet on ``device``;
    with ``backend="onnx"`` an onnxruntime session of the same network (``requested_device``
    picks its execution provider)."""
    if backend == "onnx":
        from ..onnx_backend import load_onnx_predictor

        return load_onnx_predictor(model_dir, controlnet_dir, requested_device)
    def stamp(p: Optional[Path]):
        return None if p is None else (str(p.resolve()), (p / "model.safetensors").stat().st_mtime_ns)

    key = (stamp(model_dir), stamp(controlnet_dir), str(device))
    with _CACHE_LOCK:
        if key not in _CACHE:
            from .. import weights

            # header, no pickles, and the registry's sha256 when the directory is a registered model
            weights.verify(model_dir)
            if controlnet_dir is not None:
                weights.verify(controlnet_dir)
            if len(_CACHE) >= 4:
                _CACHE.pop(next(iter(_CACHE)))
            if controlnet_dir is None:
                _CACHE[key] = NoisePredictor(load_base(model_dir, device)).eval()
            else:
                _CACHE[key] = load_controlnet(controlnet_dir, model_dir, device).eval()
        return _CACHE[key]


def sampler_for(predictor: NoisePredictor, params: dict, device: torch.device, **overrides) -> PatchSampler:
    precision = params.get("precision", "auto")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    opts = SamplerOptions(
        steps=int(params["steps"]), method=params.get("method", "ddim"), seed=int(params["seed"]),
        window=int(params.get("window") or 0) or None, overlap=float(params.get("overlap", 0.25)),
        batch_size=int(params.get("batch_size", 4)), precision=precision, **overrides)
    return PatchSampler(predictor, opts, device)


def resolve_region(request: TaskRequest, image: Optional[Volume]) -> str:
    if request.region in (None, "", "auto"):
        if image is None:
            raise ValueError("region 'auto' needs an image to guess from; give the region "
                             f"({', '.join(preprocessing.REGIONS)})")
        return preprocessing.guess_region(image.array, image.ijk_to_ras)
    return preprocessing.check_region(request.region)


@dataclass
class ModelGrid:
    """An input moved onto the model's isotropic grid."""

    ijk_to_ras: np.ndarray
    shape: tuple[int, int, int]
    unit: Optional[np.ndarray] = None  # image in model units, when there is an image
    hu: Optional[np.ndarray] = None  # the same image in HU, before windowing (it may be the input itself)


def to_model_grid(image: Volume, spacing_mm: float, region: str) -> ModelGrid:
    """Resample (linear) to the model spacing and window to [-1, 1]."""
    arr, m = preprocessing.resample(image.array.astype(np.float32, copy=False), image.ijk_to_ras,
                                    (spacing_mm,) * 3, order=1)
    return ModelGrid(m, tuple(arr.shape), preprocessing.hu_to_unit(arr, region), arr)


def grid_only(reference: Volume, spacing_mm: float) -> ModelGrid:
    from ..geometry import regrid

    m, shape = regrid(reference.ijk_to_ras, reference.shape, (spacing_mm,) * 3)
    return ModelGrid(m, tuple(shape))


def back_to_input_grid(array: np.ndarray, grid: ModelGrid, target: Volume, order: int = 1) -> np.ndarray:
    """Resample a model-grid array onto the input's grid (identity when the grids agree)."""
    return preprocessing.resample_to_grid(array, grid.ijk_to_ras, target.shape, target.ijk_to_ras, order=order)


def anatomy_on_grid(request: TaskRequest, grid: ModelGrid) -> tuple[Optional[torch.Tensor], list[str]]:
    """The anatomy label map as a group map on the model grid, and the class names not understood."""
    if request.anatomy is None:
        return None, []
    lab = check_label_volume(request.anatomy, "anatomy label map")
    on_grid = preprocessing.resample_to_grid(lab.array, lab.ijk_to_ras, grid.shape, grid.ijk_to_ras, order=0)
    groups, unknown = anatomy.group_map(on_grid, request.anatomy_names)
    return torch.from_numpy(groups), unknown


def check_label_volume(vol: Volume, what: str) -> Volume:
    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise ValueError(f"the {what} must be 3-D, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"the {what} contains NaN values")
    return vol


def mask_on_grid(mask: Volume, shape, ijk_to_ras, what: str = "mask") -> np.ndarray:
    """A boolean mask resampled (nearest) onto a grid; refuses empty masks."""
    check_label_volume(mask, what)
    m = preprocessing.resample_to_grid(np.asarray(mask.array) > 0, mask.ijk_to_ras, tuple(shape), ijk_to_ras,
                                       order=0)
    m = np.asarray(m, dtype=bool)
    if not m.any():
        raise ValueError(f"the {what} is empty on the image grid (no voxel inside the image); draw it inside the image")
    return m


def region_index(region: str) -> int:
    return REGION_INDEX[region]


def require_image(request: TaskRequest) -> Volume:
    return check_image(request.image)


def box_around(mask: np.ndarray, margin: int, min_size: int) -> tuple[slice, slice, slice]:
    """A box around the mask's voxels, grown by ``margin`` and to at least ``min_size`` per axis
    (clipped to the volume): local tasks sample only there."""
    idx = np.nonzero(mask)
    box = []
    for a, n in enumerate(mask.shape):
        lo, hi = int(idx[a].min()) - margin, int(idx[a].max()) + 1 + margin
        if hi - lo < min_size:
            grow = min_size - (hi - lo)
            lo, hi = lo - grow // 2, hi + grow - grow // 2
        lo, hi = max(0, lo), min(n, hi)
        if hi - lo < min(min_size, n):  # hit a border: extend on the other side
            lo, hi = (0, min(n, min_size)) if lo == 0 else (max(0, n - min_size), n)
        box.append(slice(lo, hi))
    return tuple(box)  # type: ignore[return-value]


def coord_range(box: tuple[slice, ...], shape: tuple[int, ...]) -> list[tuple[float, float]]:
    """Normalised whole-volume coordinates of a box's first and last voxel, per axis: a crop
    keeps telling the network where it sits in the whole volume."""
    out = []
    for sl, n in zip(box, shape):
        c = (lambda i: -1.0 + 2.0 * i / (n - 1)) if n > 1 else (lambda i: 0.0)
        out.append((c(sl.start), c(sl.stop - 1)))
    return out
