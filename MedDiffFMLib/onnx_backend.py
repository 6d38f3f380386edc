"""ONNX Runtime backend: the same sampler, only the network call runs in onnxruntime.

A model (the foundation network, or the foundation network with one task ControlNet) is
exported once with torch's TorchScript-based exporter (opset 17; batch and window size are
dynamic axes) and cached as ``<cache>/<name>.onnx``, the name built from the sha256 of the
weights, so new weights never reuse a stale graph. :class:`OnnxPredictor` has exactly the
call signature of :meth:`MedDiffFMLib.networks.NoisePredictor.forward`, so the patch sampler
runs unchanged on top of it.

Execution providers: onnxruntime's CUDA provider when ``onnxruntime-gpu`` is installed (and
the device is not "cpu"), otherwise its CPU provider. With the CUDA provider and inputs
already on a CUDA device (a CUDA build of torch), the tensors are bound in place (no copy
through the host); with a CPU-only torch (e.g. inside 3D Slicer) onnxruntime copies each batch
to the GPU and back, which is still far faster than running the network on the CPU.

Install: ``pip install meddiff-fm[onnx]`` (CPU) or ``pip install onnxruntime-gpu`` for GPUs.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .checkpoint import load_base, load_controlnet, read_config, sha256_file
from .networks import ControlNetConfig, ModelConfig, NoisePredictor

OPSET = 17
FORMAT_VERSION = 1  # bump when the exported graph's inputs change: old cache entries are ignored
ENV_CACHE_DIR = "MEDDIFFFM_ONNX_CACHE"
BASE_INPUTS = ("x_t", "t", "coords", "anatomy_channels", "region", "spacing")
CONTROL_INPUTS = ("control", "control_scale")
OUTPUT = "eps"


def require_onnxruntime(export: bool = False):
    """The onnxruntime module, or a one-line error saying how to install it. ``export``: also
    the onnx package, which torch's exporter writes the graph with."""
    try:
        if export:
            import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        raise RuntimeError("the onnx backend needs onnxruntime: pip install 'meddiff-fm[onnx]' "
                           "(or onnxruntime-gpu for NVIDIA GPUs)") from None
    return onnxruntime


def cache_dir() -> Path:
    """Where exported graphs live: ``$MEDDIFFFM_ONNX_CACHE`` or ``~/.meddifffm/onnx``."""
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".meddifffm" / "onnx"


def graph_name(model_dir: Path, controlnet_dir: Optional[Path] = None) -> str:
    """``base-<sha>[-<task>-<sha>]-opset17-v1``: the weights' sha256 (first 16 hex digits)."""
    name = f"base-{sha256_file(Path(model_dir) / 'model.safetensors')[:16]}"
    if controlnet_dir is not None:
        task = read_config(controlnet_dir)["task"]
        name += f"-{task}-{sha256_file(Path(controlnet_dir) / 'model.safetensors')[:16]}"
    return f"{name}-opset{OPSET}-v{FORMAT_VERSION}"


# --------------------------------------------------------------------------------- export
# The network call's arguments, by name: the ONNX predictor takes exactly these.
PREDICTOR_SIGNATURE = inspect.signature(NoisePredictor.forward)


class _Graph(nn.Module):
    """The predictor with every argument a tensor (the exporter's calling shape), passed by name
    to the arguments ``NoisePredictor.forward`` has."""

    def __init__(self, predictor: NoisePredictor):
        super().__init__()
        self.predictor = predictor

    def forward(self, x_t, t, coords, anatomy_channels, region, spacing, control=None, control_scale=None):
        named = {"x_t": x_t, "t": t, "coords": coords, "anatomy_channels": anatomy_channels, "region": region,
                 "spacing": spacing}
        if control is not None:
            named.update(control=control, control_scale=control_scale)
        return self.predictor(**{k: v for k, v in named.items() if k in PREDICTOR_SIGNATURE.parameters})


def _example_inputs(cfg: ModelConfig, control_channels: int, batch: int = 2) -> dict[str, torch.Tensor]:
    """Random inputs of one window: (B, C, w, w, w) float32, (B,) int64 t and region, (B, 3) mm."""
    w = cfg.window
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "x_t": torch.randn(batch, 1, w, w, w, generator=gen),
        "t": torch.tensor([cfg.num_train_timesteps // 2, 10][:batch] + [0] * max(0, batch - 2)),
        "coords": torch.rand(batch, 3, w, w, w, generator=gen) * 2 - 1,
        "anatomy_channels": (torch.rand(batch, cfg.anatomy_channels, w, w, w, generator=gen) > 0.9).float(),
        "region": torch.arange(batch) % (cfg.num_regions + 1),
        # voxel sizes (k, j, i) in mm, different per window so the graph keeps the input in use
        "spacing": torch.tensor([cfg.clamp_spacing((1.0 + 1.5 * (b % 2), 0.7, 0.8)) for b in range(batch)]),
    }
    if control_channels:
        inputs["control"] = torch.randn(batch, control_channels, w, w, w, generator=gen)
        inputs["control_scale"] = torch.tensor(1.0)
    return inputs


def _load_torch(model_dir: Path, controlnet_dir: Optional[Path]) -> NoisePredictor:
    if controlnet_dir is None:
        return NoisePredictor(load_base(model_dir, "cpu")).eval()
    return load_controlnet(controlnet_dir, model_dir, "cpu").eval()


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: the graph, its size and its agreement with torch."""

    path: Path
    size_bytes: int
    max_abs_diff: float  # ONNX Runtime (CPU) against torch on a random batch of two windows
    cached: bool = False


def export_onnx(model_dir: str | os.PathLike, controlnet_dir: Optional[str | os.PathLike] = None,
                output: Optional[str | os.PathLike] = None, *, force: bool = False) -> ExportReport:
    """Export the foundation model (and optionally one ControlNet on it) to ONNX.

    Args:
        model_dir: foundation model directory (``config.json`` + ``model.safetensors``).
        controlnet_dir: a ControlNet directory trained on that model, or None.
        output: where to write the ``.onnx`` file (default: :func:`cache_dir` / :func:`graph_name`).
        force: export again even when the file exists.

    Returns:
        An :class:`ExportReport`. A sidecar ``<file>.json`` records the weights' sha256, the
        opset and the measured difference. The file is written atomically.
    """
    model_dir = Path(model_dir)
    controlnet_dir = Path(controlnet_dir) if controlnet_dir is not None else None
    target = Path(output) if output is not None else cache_dir() / f"{graph_name(model_dir, controlnet_dir)}.onnx"
    sidecar = target.with_name(target.name + ".json")
    if target.is_file() and sidecar.is_file() and not force:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        return ExportReport(target, target.stat().st_size, float(info["max_abs_diff"]), cached=True)
    ort = require_onnxruntime(export=True)
    predictor = _load_torch(model_dir, controlnet_dir)
    control_channels = predictor.controlnet.cfg.control_channels if predictor.controlnet is not None else 0
    inputs = _example_inputs(predictor.cfg, control_channels)
    names = list(inputs)
    volume_axes = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    dynamic = {n: volume_axes for n in ("x_t", "coords", "anatomy_channels", "control", OUTPUT) if n in names + [OUTPUT]}
    dynamic.update({n: {0: "batch"} for n in ("t", "region", "spacing")})
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(target.parent), prefix=f".{target.stem}.", suffix=".tmp.onnx")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape checks that hold for every window
            expected = _Graph(predictor)(**inputs).numpy()
            torch.onnx.export(_Graph(predictor), tuple(inputs.values()), tmp, dynamo=False, opset_version=OPSET,
                              input_names=names, output_names=[OUTPUT], dynamic_axes=dynamic)
        session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
        # the exporter drops inputs the network does not use (e.g. spacing, for a network without it)
        used = {i.name for i in session.get_inputs()}
        got = session.run([OUTPUT], {n: v.numpy() for n, v in inputs.items() if n in used})[0]
        diff = float(np.abs(got - expected).max())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    info = {"format_version": FORMAT_VERSION, "opset": OPSET, "torch": torch.__version__, "inputs": names,
            "base_sha256": sha256_file(model_dir / "model.safetensors"), "max_abs_diff": diff,
            "controlnet_sha256": sha256_file(controlnet_dir / "model.safetensors") if controlnet_dir else None}
    fd, tmp_json = tempfile.mkstemp(dir=str(target.parent), prefix=f".{target.stem}.", suffix=".tmp.json")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(info, indent=1) + "\n")
    os.replace(tmp_json, sidecar)
    return ExportReport(target, target.stat().st_size, diff)


# ------------------------------------------------------------------------------ inference
def _parse_device(device: str | torch.device) -> tuple[str, int]:
    """("cpu" | "cuda" | "auto", CUDA device index) of a device request."""
    text = str(device or "auto").lower()
    if text == "cpu":
        return "cpu", 0
    if text == "gpu" or text.startswith("cuda"):
        return "cuda", int(text.split(":", 1)[1]) if ":" in text else 0
    if text != "auto":
        raise ValueError(f"unknown device {str(device)!r}; use auto, cpu, cuda or cuda:N")
    return "auto", 0


def providers_for(device: str | torch.device) -> list[str]:
    """onnxruntime providers for a device request: CUDA first when installed and not "cpu"."""
    ort = require_onnxruntime()
    available = ort.get_available_providers()
    kind, _ = _parse_device(device)
    if kind != "cpu" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if kind == "cuda":
        raise RuntimeError(f"device {str(device)!r} asked for with the onnx backend, but onnxruntime has no CUDA "
                           f"provider (available: {', '.join(available)}); pip install onnxruntime-gpu, or use "
                           "device 'cpu'")
    return ["CPUExecutionProvider"]


def sampler_device(device: str) -> torch.device:
    """Where the sampler keeps its tensors with the onnx backend: the CUDA device when torch
    itself has CUDA and the request is not "cpu", else the CPU (onnxruntime then copies)."""
    device = (device or "auto").lower()
    if device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda" if device in ("auto", "gpu") else device)
    return torch.device("cpu")


@dataclass(frozen=True)
class _ControlNetInfo:
    """Stands in for the torch ControlNet where callers only read its config."""

    cfg: ControlNetConfig


class OnnxPredictor(nn.Module):
    """A :class:`NoisePredictor` whose network call runs in an onnxruntime session.

    Attributes:
        cfg: the foundation model's :class:`ModelConfig` (the sampler reads the window, the
            schedule and the downsampling factor from it).
        controlnet: None, or an object whose ``cfg`` is the ControlNet's config.
        providers: the session's execution providers, best first.
    """

    def __init__(self, path: str | os.PathLike, cfg: ModelConfig, controlnet_cfg: Optional[ControlNetConfig] = None,
                 device: str | torch.device = "cpu", threads: Optional[int] = None):
        super().__init__()
        ort = require_onnxruntime()
        self.cfg = cfg
        self.controlnet = _ControlNetInfo(controlnet_cfg) if controlnet_cfg is not None else None
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        self.providers = providers_for(device)
        _, self.device_id = _parse_device(device)
        provider_options = [{"device_id": self.device_id} if p == "CUDAExecutionProvider" else {}
                            for p in self.providers]
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers,
                                            provider_options=provider_options)
        self.input_names = [i.name for i in self.session.get_inputs()]
        known = BASE_INPUTS + (CONTROL_INPUTS if controlnet_cfg is not None else ())
        if not set(self.input_names) <= set(known) or "x_t" not in self.input_names:
            raise ValueError(f"{path} takes inputs {self.input_names}, expected some of {list(known)}: export it again")

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """Predict epsilon (B, 1, D, H, W) float32 on ``x_t``'s device.

        Takes exactly the arguments of :meth:`NoisePredictor.forward` (:data:`PREDICTOR_SIGNATURE`):
        x_t (B, 1, D, H, W) noisy windows; t (B,) integer timesteps; coords (B, 3, D, H, W)
        whole-volume coordinates in [-1, 1]; anatomy_channels (B, A, D, H, W); region (B,)
        indices (0 = null); spacing (B, 3) mm per axis (k, j, i), where the network takes it;
        control (B, C, D, H, W) (required with a ControlNet); control_scale (float).
        """
        call = PREDICTOR_SIGNATURE.bind(self, *args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        x_t, control = a["x_t"], a.get("control")
        if self.controlnet is not None and control is None:
            raise ValueError("this model has a ControlNet: a control condition is required")
        values = {"x_t": lambda: x_t.float(), "t": lambda: a["t"].long(), "coords": lambda: a["coords"].float(),
                  "anatomy_channels": lambda: a["anatomy_channels"].float(), "region": lambda: a["region"].long(),
                  "spacing": lambda: torch.as_tensor(a["spacing"], dtype=torch.float32, device=x_t.device),
                  "control": lambda: control.float(),
                  "control_scale": lambda: torch.tensor(float(a["control_scale"]), dtype=torch.float32,
                                                        device=x_t.device)}
        # only what the graph takes: the exporter drops inputs the network ignores
        feeds = {n: values[n]() for n in self.input_names}
        if x_t.is_cuda and self.providers[0] == "CUDAExecutionProvider":
            return self._run_bound(feeds, x_t)
        out = self.session.run([OUTPUT], {n: v.detach().cpu().contiguous().numpy() for n, v in feeds.items()})[0]
        return torch.from_numpy(out).to(x_t.device)

    def _run_bound(self, feeds: dict[str, torch.Tensor], x_t: torch.Tensor) -> torch.Tensor:
        """CUDA tensors in and out without a host copy (onnxruntime I/O binding)."""
        binding = self.session.io_binding()
        keep = []
        for name, value in feeds.items():
            value = value.contiguous()
            keep.append(value)
            dev = value.device
            binding.bind_input(name=name, device_type="cuda" if dev.type == "cuda" else "cpu",
                               device_id=(dev.index or 0) if dev.type == "cuda" else 0,
                               element_type=np.float32 if value.dtype == torch.float32 else np.int64,
                               shape=tuple(value.shape), buffer_ptr=value.data_ptr())
        out = torch.empty((x_t.shape[0], 1, *x_t.shape[2:]), dtype=torch.float32, device=x_t.device)
        binding.bind_output(name=OUTPUT, device_type="cuda", device_id=x_t.device.index or 0,
                            element_type=np.float32, shape=tuple(out.shape), buffer_ptr=out.data_ptr())
        torch.cuda.synchronize(x_t.device)  # the inputs are written by torch's stream
        self.session.run_with_iobinding(binding)
        return out


_SESSIONS: dict[tuple, OnnxPredictor] = {}
_SESSIONS_LOCK = threading.Lock()


def load_onnx_predictor(model_dir: Path, controlnet_dir: Optional[Path], device: str | torch.device) -> OnnxPredictor:
    """Export (once, cached by sha256) and open the ONNX graph of a model; sessions are reused
    while the weights files are unchanged."""
    model_dir = Path(model_dir)
    controlnet_dir = Path(controlnet_dir) if controlnet_dir is not None else None

    def stamp(p: Optional[Path]):
        return None if p is None else (str(p.resolve()), (p / "model.safetensors").stat().st_mtime_ns)

    key = (stamp(model_dir), stamp(controlnet_dir), str(device), torch.get_num_threads())
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            path = export_onnx(model_dir, controlnet_dir).path
            if len(_SESSIONS) >= 4:
                _SESSIONS.pop(next(iter(_SESSIONS)))
            cfg = _base_config(model_dir)
            cn_cfg = ControlNetConfig.from_dict(read_config(controlnet_dir)) if controlnet_dir is not None else None
            _SESSIONS[key] = OnnxPredictor(path, cfg, cn_cfg, device)
        return _SESSIONS[key]


def _base_config(model_dir: Path) -> ModelConfig:
    raw = read_config(model_dir)
    return ModelConfig.from_dict({k: v for k, v in raw.items() if k not in ("kind", "format", "meta")})



# ------------------------------------------------------------------------------ command line
def add_cli(sub) -> None:
    """Register ``meddiff-fm export-onnx`` on the CLI's subparsers."""
    p = sub.add_parser("export-onnx", help="export the foundation model and each ControlNet to ONNX",
                       description="Export the foundation model, and the foundation model with each task "
                                   "ControlNet, to ONNX (opset 17, dynamic batch and window size) for the "
                                   "onnx backend (--backend onnx on every task). Files are named by the weights' "
                                   f"sha256; the default folder is the cache (${ENV_CACHE_DIR} or "
                                   "~/.meddifffm/onnx), where the backend finds them.")
    p.add_argument("--model", default=None, help="foundation model directory or registry id (default: the bundled "
                                                 "demo weights)")
    p.add_argument("--controlnet", nargs="*", default=None,
                   help="ControlNet directories or registry ids (default: the registered ControlNet of every task "
                        "that has one; give the option with no value to export the foundation model only)")
    p.add_argument("--output-dir", default=None, help="folder for the .onnx files (default: the cache)")
    p.add_argument("--force", action="store_true", help="export again even when a file exists")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from . import weights

    model_dir = Path(weights.resolve_model(args.model, kind="base"))
    if args.controlnet is None:
        controlnets = []
        base_sha = sha256_file(model_dir / "model.safetensors")
        for task in ("superres", "lesion"):
            try:
                cn = Path(weights.resolve_model(None, kind="controlnet", task=task))
            except FileNotFoundError:
                continue  # no ControlNet registered for this task
            if read_config(cn).get("base_sha256") in ("", base_sha):  # trained on this foundation model
                controlnets.append(cn)
            else:
                print(f"export-onnx: skipped ControlNet {cn.name}: it was trained on another foundation model")
    else:
        controlnets = [Path(weights.resolve_model(c, kind="controlnet")) for c in args.controlnet]
    for cn in [None, *controlnets]:
        target = None
        if args.output_dir is not None:
            target = Path(args.output_dir) / f"{graph_name(model_dir, cn)}.onnx"
        report = export_onnx(model_dir, cn, target, force=args.force)
        what = "foundation model" if cn is None else f"with ControlNet {cn.name}"
        state = "cached" if report.cached else f"{report.size_bytes / 1e6:.1f} MB"
        print(f"export-onnx: {what}: {report.path} ({state}; max |onnx - torch| {report.max_abs_diff:.2g})")
    return 0
