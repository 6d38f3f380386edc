"""Rows of the speed report and the measurements that fill them."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..networks import ModelConfig
from .measure import (PeakHostMemory, _call_args, _window_inputs, bare_network_seconds, count_flops,
                      sampler_step_seconds, window_layout)

TARGET_50_STEPS_S = 20.0
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor's data sheets; the floor uses the
# first name that occurs in torch.cuda.get_device_name(), else --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10": 125.0, "RTX 4090": 165.0}
REFERENCE_GPU = "H100 SXM"


@dataclass
class StepRow:
    """One model on one volume. Seconds are per sampling step; memory in MiB."""

    model: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    window: tuple[int, int, int]
    windows: int
    batch_size: int
    step_s: Optional[float]  # None: not run (over --max-windows)
    network_s: Optional[float]  # inside the network calls of that step
    machinery_s: Optional[float]  # the rest of the step
    bare_network_s: float  # the same windows' network time from one batch of pre-built inputs
    peak_host_mib: Optional[float]
    volume_mib: float  # one float32 copy of the volume
    peak_device_mib: Optional[float]
    tflop_per_step: float
    achieved_tflops: Optional[float]


@dataclass
class FloorRow:
    """The FLOP floor of 50 steps of a model on a volume, at a GPU's peak bf16 rate."""

    model: str
    shape: tuple[int, int, int]
    windows: int
    tflop_per_window: float
    tflop_per_step: float
    gpu: str
    peak_tflops: float
    floor_step_s: float
    floor_50_steps_s: float
    measured_50_steps_s: Optional[float]  # None: not measured on this machine
    target_50_steps_s: float = TARGET_50_STEPS_S


@dataclass
class IORow:
    """Before / after of one data-path operation on the same data, in the same run."""

    operation: str
    voxels: int
    before: str
    before_s: float
    after: str
    after_s: float
    detail: str = ""


@dataclass
class BackendRow:
    """One network call on one batch of windows, torch against onnxruntime, same inputs."""

    model: str
    window: tuple[int, int, int]
    batch_size: int
    torch_s: float
    onnx_s: float
    onnx_providers: str
    max_abs_diff: float


@dataclass
class SpeedReport:
    device: str
    threads: int
    torch_version: str
    steps: list[StepRow] = field(default_factory=list)
    floors: list[FloorRow] = field(default_factory=list)
    io: list[IORow] = field(default_factory=list)
    backends: list[BackendRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def measure_step(name: str, predictor, shape, spacing_mm, device: torch.device, *, steps: int, batch_size: int,
                 precision: str, max_windows: Optional[int] = None) -> StepRow:
    """A :class:`StepRow`: the sampler's step and the bare network on the same windows. Over
    ``max_windows`` the sampler is not run: the row keeps the layout, FLOPs and network time
    (step, machinery and memory are None)."""
    window, windows = window_layout(predictor, shape, batch_size)
    per_batch = bare_network_seconds(predictor, window, batch_size, device, precision)
    flops = count_flops(predictor.cfg, window) * windows
    volume_mib = round(int(np.prod(shape)) * 4 / 2 ** 20, 4)
    row = StepRow(name, tuple(shape), tuple(float(s) for s in spacing_mm), window, windows, batch_size, None,
                  None, None, round(per_batch * windows / batch_size, 4), None, volume_mib, None, flops / 1e12, None)
    if max_windows is not None and windows > max_windows:
        return row
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with PeakHostMemory() as host:
        step_s, network_s = sampler_step_seconds(predictor, shape, spacing_mm, device, steps, batch_size, precision)
    row.step_s = round(step_s, 4)
    row.network_s = round(network_s, 4)
    row.machinery_s = round(step_s - network_s, 4)
    row.peak_host_mib = None if host.peak_bytes is None else round(host.peak_bytes / 2 ** 20, 1)
    if device.type == "cuda":
        row.peak_device_mib = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    row.achieved_tflops = flops / 1e12 / step_s
    return row


def flop_floor(name: str, cfg: ModelConfig, predictor_for_layout, shape, gpu: str, peak_tflops: float,
               measured_step_s: Optional[float]) -> FloorRow:
    window, windows = window_layout(predictor_for_layout, shape)
    per_window = count_flops(cfg, window) / 1e12
    step = per_window * windows
    floor = step / peak_tflops
    return FloorRow(name, tuple(shape), windows, per_window, step, gpu, peak_tflops, floor, 50 * floor,
                    None if measured_step_s is None else round(50 * measured_step_s, 2))


def gpu_peak(device: torch.device, override: Optional[float]) -> tuple[str, float]:
    """(GPU name, peak bf16 TFLOP/s) of ``device``; the reference GPU's when not on CUDA."""
    if device.type != "cuda":
        return REFERENCE_GPU + " (reference; not this machine)", PEAK_BF16_TFLOPS[REFERENCE_GPU]
    name = torch.cuda.get_device_name(device)
    if override:
        return name, float(override)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key.lower() in name.lower():
            return name, peak
    return name + " (unknown peak: give --peak-tflops)", math.nan


def backend_row(name: str, model_dir: Optional[Path], predictor, device: str, batch: int,
                precision: str) -> Optional[BackendRow]:
    """torch against the onnx backend on one batch of full windows; None without onnxruntime.
    ``model_dir`` None: an in-memory model, exported to a temporary folder (not the cache)."""
    try:
        from .. import onnx_backend

        onnx_backend.require_onnxruntime(export=True)
    except RuntimeError:
        return None
    with tempfile.TemporaryDirectory(prefix="meddifffm-speed-") as tmp:
        if model_dir is None:
            from ..checkpoint import save_model

            saved = save_model(Path(tmp) / "model", predictor.cfg, predictor.base.state_dict())
            path = onnx_backend.export_onnx(saved, output=Path(tmp) / "model.onnx").path
            onnx_predictor = onnx_backend.OnnxPredictor(path, predictor.cfg, None, device)
        else:
            onnx_predictor = onnx_backend.load_onnx_predictor(model_dir, None, device)
        on_gpu = onnx_predictor.providers[0] == "CUDAExecutionProvider" and torch.cuda.is_available()
        onnx_device = torch.device("cuda" if on_gpu else "cpu")
        torch_device = next(predictor.parameters()).device
        window = (predictor.cfg.window,) * 3
        torch_s = bare_network_seconds(predictor, window, batch, torch_device, precision)
        onnx_s = bare_network_seconds(onnx_predictor, window, batch, onnx_device, "fp32")
        inputs = _window_inputs(predictor.cfg, window, 1, torch.device("cpu"))
        with torch.inference_mode():
            ref = predictor(*_call_args(predictor, {k: v.to(torch_device) for k, v in inputs.items()})).cpu()
            got = onnx_predictor(*_call_args(onnx_predictor, {k: v.to(onnx_device) for k, v in inputs.items()}))
        diff = float((got.cpu() - ref).abs().max())
        providers = ",".join(onnx_predictor.providers)
        del onnx_predictor
    return BackendRow(name, window, batch, torch_s, onnx_s, providers, diff)


def io_rows(shape, spacing_mm, quick: bool) -> list[IORow]:
    """Resampling back to the input grid (map_coordinates vs the fast resampler) and writing
    float32 vs integer HU NIfTI, on a CT-like volume of ``shape``."""
    from .. import io, preprocessing, resample
    from ..geometry import make_ijk_to_ras, regrid
    from ..volume import Volume

    rng = np.random.default_rng(0)
    # an oblique input grid; the model grid shares its axes (as geometry.regrid makes it)
    c, s = math.cos(0.3), math.sin(0.3)
    target = make_ijk_to_ras(spacing_mm, (-120.0, 80.0, 30.0), np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]))
    model_m, model_shape = regrid(target, shape, (1.0, 1.0, 1.0))
    model_hu = _ct_like(model_shape, rng)
    rows = []
    t0 = time.perf_counter()
    ref = preprocessing.resample_to_grid(model_hu, model_m, shape, target, order=1)
    t1 = time.perf_counter()
    fast = resample.resample_to_grid(model_hu, model_m, shape, target, order=1)
    t2 = time.perf_counter()
    diff = float(np.abs(fast.astype(np.float64) - ref).max())
    rows.append(IORow("resample model grid -> input grid (linear)", int(np.prod(shape)),
                      "preprocessing (map_coordinates per slice)", round(t1 - t0, 3),
                      "resample (separable torch passes)", round(t2 - t1, 3),
                      f"model grid {model_shape}; max |difference| {diff:.2g} HU"))
    with tempfile.TemporaryDirectory() as tmp:
        hu = np.rint(ref).astype(np.float32)  # integer-valued HU, as CT is stored
        sizes, times = {}, {}
        for kind, arr in (("float32", hu), ("int16", hu.astype(np.int16))):
            path = Path(tmp) / f"{kind}.nii.gz"
            t0 = time.perf_counter()
            io.write_volume(path, Volume(arr, target))
            times[kind] = time.perf_counter() - t0
            sizes[kind] = path.stat().st_size
        back = io.read_volume(Path(tmp) / "int16.nii.gz").array
        exact = bool(np.array_equal(back, hu))
    rows.append(IORow("write .nii.gz", int(np.prod(shape)), f"float32 ({sizes['float32'] / 2 ** 20:.1f} MiB)",
                      round(times["float32"], 3), f"int16 HU ({sizes['int16'] / 2 ** 20:.1f} MiB)",
                      round(times["int16"], 3), f"integer HU read back exactly: {exact}"))
    return rows


def _ct_like(shape, rng) -> np.ndarray:
    """Smooth body, organs and bone in HU plus 10 HU noise (float32)."""
    z, y, x = np.ogrid[tuple(slice(-1, 1, complex(0, n)) for n in shape)]
    hu = np.where(x ** 2 + y ** 2 < 0.8, 40.0, -1000.0).astype(np.float32)
    hu = hu + np.where((x - 0.2) ** 2 + (y + 0.1) ** 2 + 0 * z < 0.02, 1000.0, 0.0).astype(np.float32)
    return hu + rng.normal(0.0, 10.0, shape).astype(np.float32)
