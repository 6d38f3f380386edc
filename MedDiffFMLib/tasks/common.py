"""What the tasks share: models, devices, samplers, and the checks of the prepare step.

Tasks run on the input's own grid: nothing here resamples the image. Masks and anatomy
maps drawn on other grids are brought onto the image grid (nearest neighbour).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import anatomy, preprocessing
from ..geometry import spacing_kji
from ..networks import REGION_INDEX, ControlNetConfig, ModelConfig
from ..volume import Volume
from .base import TaskRequest, check_image
from .registry import TaskSpec

# The whole-volume passes hold a few float32 copies of the volume on the device; past this
# many voxels a run would need tens of GB (or hours on a CPU): refuse before any work.
MAX_VOXELS = 400_000_000


def resolve_device(device: str = "auto", backend: str = "torch"):
    """'auto' -> the first CUDA GPU when there is one, else the CPU; 'cuda[:N]' or 'cpu' as given.
    With the onnx backend: where the sampler's tensors live (``onnx_backend.sampler_device``)."""
    import torch

    if backend == "onnx":
        from ..onnx_backend import sampler_device

        return sampler_device(device)

    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "gpu":
        name = "cuda"
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA GPU is available; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: there are only {torch.cuda.device_count()} CUDA GPUs")
    return dev


def resolve_model_dir(model: Optional[str | os.PathLike], kind: str = "base", task: Optional[str] = None) -> Path:
    """A model directory from a path or a registry id (None = the default for ``kind``/``task``)."""
    from .. import weights

    return Path(weights.resolve_model(model, kind=kind, task=task))


@dataclass(frozen=True)
class Models:
    """The model directories a task will use and their configurations (read, not loaded)."""

    base_dir: Path
    cfg: ModelConfig
    controlnet_dir: Optional[Path] = None
    controlnet_cfg: Optional[ControlNetConfig] = None

    @classmethod
    def resolve(cls, spec: TaskSpec, model=None, controlnet=None) -> "Models":
        """Directories from paths or registry ids; the ControlNet must be for ``spec``'s task."""
        from ..checkpoint import CheckpointError, read_config

        base_dir = resolve_model_dir(model, kind="base")
        raw = read_config(base_dir)
        if raw.get("kind") != "base":
            raise CheckpointError(f"{base_dir} holds a {raw.get('kind')!r} model, not a foundation (base) model")
        try:
            cfg = ModelConfig.from_dict({k: v for k, v in raw.items() if k not in ("kind", "format", "meta")})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{base_dir / 'config.json'}: {e}") from None
        if spec.controlnet is None:
            return cls(base_dir, cfg)
        cn_dir = resolve_model_dir(controlnet, kind="controlnet", task=spec.controlnet)
        cn_raw = read_config(cn_dir)
        try:
            cn_cfg = ControlNetConfig.from_dict(cn_raw)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{cn_dir / 'config.json'}: {e}") from None
        if cn_cfg.task != spec.controlnet:
            raise ValueError(f"the ControlNet in {cn_dir} was trained for {cn_cfg.task!r}; task {spec.name!r} "
                             f"needs a {spec.controlnet!r} ControlNet")
        return cls(base_dir, cfg, cn_dir, cn_cfg)


_CACHE: dict[tuple, object] = {}
_CACHE_LOCK = threading.Lock()


def load_predictor(models: Models, device, backend: str = "torch", requested_device: str = "auto"):
    """Load (or reuse, for batch loops) the base model and optional ControlNet on ``device``;
    with ``backend="onnx"`` an onnxruntime session of the same network (``requested_device``
    picks its execution provider)."""
    if backend == "onnx":
        from ..onnx_backend import load_onnx_predictor

        return load_onnx_predictor(models.base_dir, models.controlnet_dir, requested_device)
    from .. import weights
    from ..checkpoint import load_base, load_controlnet
    from ..networks import NoisePredictor

    def stamp(p: Optional[Path]):
        return None if p is None else (str(p.resolve()), (p / "model.safetensors").stat().st_mtime_ns)

    key = (stamp(models.base_dir), stamp(models.controlnet_dir), str(device))
    with _CACHE_LOCK:
        if key not in _CACHE:
            # header, no pickles, and the registry's sha256 when the directory is a registered model
            weights.verify(models.base_dir)
            if models.controlnet_dir is not None:
                weights.verify(models.controlnet_dir)
            if len(_CACHE) >= 4:
                _CACHE.pop(next(iter(_CACHE)))
            if models.controlnet_dir is None:
                _CACHE[key] = NoisePredictor(load_base(models.base_dir, device)).eval()
            else:
                _CACHE[key] = load_controlnet(models.controlnet_dir, models.base_dir, device).eval()
        return _CACHE[key]


def sampler_for(predictor, params: dict, device, **overrides):
    """A :class:`PatchSampler` from a task's parameters."""
    import torch

    from ..sampling import PatchSampler, SamplerOptions

    precision = params.get("precision", "auto")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    opts = SamplerOptions(
        steps=int(params["steps"]), method=params.get("method", "ddim"), seed=int(params["seed"]),
        window=int(params.get("window") or 0) or None, overlap=float(params.get("overlap", 0.25)),
        batch_size=int(params.get("batch_size", 4)), precision=precision,
        guidance_scale=float(params.get("guidance_scale", 1.0)),
        control_scale=float(params.get("control_scale", 1.0)), compile=bool(params.get("compile", False)),
        mirrors=int(params.get("mirrors", 1)),
        **overrides)
    return PatchSampler(predictor, opts, device)


# --------------------------------------------------------------------------------- prepare
def resolve_region(request: TaskRequest, image: Optional[Volume]) -> str:
    if request.region in (None, "", "auto"):
        if image is None:
            raise ValueError("region 'auto' needs an image to guess from; give the region "
                             f"({', '.join(preprocessing.REGIONS)})")
        return preprocessing.guess_region(image.array, image.ijk_to_ras)
    return preprocessing.check_region(request.region)


def require_image(request: TaskRequest, max_voxels: int = MAX_VOXELS) -> Volume:
    """The checked input image (finite, 3-D, real, plausible spacing, bounded size)."""
    image = check_image(request.image)
    check_grid(image.ijk_to_ras, image.shape, "image", max_voxels)
    return image


def check_grid(ijk_to_ras, shape, what: str, max_voxels: int = MAX_VOXELS) -> np.ndarray:
    """Voxel sizes of a grid (k, j, i) mm; refuses implausible ones and grids too large to sample."""
    sp = spacing_kji(ijk_to_ras)
    if not np.all(np.isfinite(sp)) or np.any(sp < 0.05) or np.any(sp > 20.0):
        pretty = " x ".join(f"{s:g}" for s in sp[::-1])
        raise ValueError(f"the {what} has voxels of {pretty} mm (i x j x k): CT voxels are 0.05 to 20 mm; "
                         "check the file's spacing")
    n = int(np.prod([int(s) for s in shape]))
    if n > max_voxels:
        raise ValueError(f"the {what} has {n / 1e6:.0f} M voxels, more than the {max_voxels / 1e6:.0f} M one run "
                         "can sample; crop it to the region of interest first")
    return sp


def region_index(region: str) -> int:
    return REGION_INDEX[region]


def check_label_volume(vol: Volume, what: str) -> Volume:
    arr = np.asarray(vol.array)
    if arr.ndim != 3:
        raise ValueError(f"the {what} must be 3-D, got shape {arr.shape}")
    if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise ValueError(f"the {what} must hold numbers, got {arr.dtype}")
    if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise ValueError(f"the {what} contains NaN or infinite values")
    return vol


def on_grid(vol: Volume, shape, ijk_to_ras, order: int = 0) -> np.ndarray:
    """``vol`` on the grid (``shape``, ``ijk_to_ras``): itself when the grids agree, else resampled
    (by :mod:`~MedDiffFMLib.resample`, the fast resampler with the semantics of
    :func:`preprocessing.resample_to_grid`)."""
    from ..resample import resample_to_grid

    same = tuple(vol.array.shape) == tuple(shape) and np.allclose(vol.ijk_to_ras, ijk_to_ras, atol=1e-6)
    if same:
        return np.asarray(vol.array)
    return resample_to_grid(np.asarray(vol.array), vol.ijk_to_ras, tuple(shape), ijk_to_ras, order=order)


def anatomy_groups(request: TaskRequest, shape, ijk_to_ras) -> tuple[Optional[np.ndarray], list[str]]:
    """The anatomy label map as an int8 group map on a grid, and the class names not understood."""
    _, groups, unknown = anatomy_on_grid(request, shape, ijk_to_ras)
    return groups, unknown


def anatomy_on_grid(request: TaskRequest, shape,
                    ijk_to_ras) -> tuple[Optional[np.ndarray], Optional[np.ndarray], list[str]]:
    """(label map, int8 group map, class names not understood) on a grid; (None, None, []) without one."""
    if request.anatomy is None:
        return None, None, []
    lab = check_label_volume(request.anatomy, "anatomy label map")
    labels = np.asarray(on_grid(lab, shape, ijk_to_ras, order=0))
    groups, unknown = anatomy.group_map(labels, request.anatomy_names)
    return labels, groups, unknown


def mask_on_image(request: TaskRequest, image: Volume, what: str = "mask") -> np.ndarray:
    """The boolean mask (non-zero = inside) on the image grid; refuses empty masks."""
    if request.mask is None:
        raise ValueError(f"this task needs a {what}: draw the region first")
    check_label_volume(request.mask, what)
    inside = Volume(np.asarray(request.mask.array) != 0, request.mask.ijk_to_ras)
    m = np.asarray(on_grid(inside, image.shape, image.ijk_to_ras), dtype=bool)
    if not m.any():
        raise ValueError(f"the {what} is empty on the image grid (no voxel inside the image); draw it inside the image")
    return m


def unknown_message(unknown: list[str]) -> list[str]:
    return [f"anatomy classes not known to the model (treated as body tissue): {', '.join(unknown)}"] if unknown else []


def box_around(mask: np.ndarray, margin_vox, min_size: int) -> tuple[slice, slice, slice]:
    """A box around the mask's voxels, grown by ``margin_vox`` per axis and to at least
    ``min_size`` per axis (clipped to the volume): local tasks sample only there."""
    idx = np.nonzero(mask)
    box = []
    for a, n in enumerate(mask.shape):
        lo, hi = int(idx[a].min()) - int(margin_vox[a]), int(idx[a].max()) + 1 + int(margin_vox[a])
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


def voxel_volume_ml(image: Volume) -> float:
    return float(np.prod(image.spacing_kji)) / 1000.0
