"""Speed benchmark: where a sampling step's time and memory go, side by side in one run.

``python -m MedDiffFMLib.speed`` prints three tables:

1. **Sampling steps**, per model and volume size: seconds per step of the patch sampler,
   the bare network time of the same windows (one batch of pre-built inputs on the device,
   timed and scaled to the window count), the rest ("machinery": window inputs, blending, the
   scheduler step, copies), peak host memory (RSS above the start, also as a multiple of the
   float32 volume) and peak device memory. Rows: the demo model on growing volumes up to a
   clinical one (512 x 512 x 139 voxels at 0.7 x 0.7 x 2.5 mm); on a GPU also the ``base``
   preset (random weights) on 350 x 350 x 300 at 1 mm.
2. **FLOP floor**: FLOPs per window counted with ``torch.utils.flop_counter`` (on the meta
   device, so it runs anywhere), times the windows of a step, over the GPU's peak bf16
   rate: the fastest any implementation could take, next to the 50-step target (20 s).
3. **Resampling and writing**: resampling back to the input grid with preprocessing's
   map_coordinates against :mod:`MedDiffFMLib.resample`, and writing float32 against integer
   HU ``.nii.gz`` (time and size), on the clinical grid.

``--quick`` runs the same code on the tiny test network and small volumes in seconds (the
test suite runs it; it asserts no timings). Timings depend on the machine and its load:
compare within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .networks import REGION_INDEX, FoundationUNet, ModelConfig, NoisePredictor, preset

CLINICAL_SHAPE = (139, 512, 512)  # (k, j, i)
CLINICAL_SPACING = (2.5, 0.7, 0.7)  # mm
BASE_SHAPE = (300, 350, 350)
BASE_SPACING = (1.0, 1.0, 1.0)
TARGET_50_STEPS_S = 20.0
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor's data sheets; the floor uses the
# first name that occurs in torch.cuda.get_device_name(), else --peak-tflops.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10": 125.0, "RTX 4090": 165.0}
REFERENCE_GPU = "H100 SXM"


# ------------------------------------------------------------------------------ measuring tools
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


class PeakHostMemory:
    """Peak resident memory above the level at entry, sampled every 2 ms (Linux; None elsewhere)."""

    def __init__(self):
        self.peak_bytes: Optional[int] = None
        self._stop = threading.Event()

    def __enter__(self):
        self._start = _rss_bytes()
        self._peak = self._start
        if self._start is not None:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes() or 0)
        self.peak_bytes = self._peak - self._start


_FLOPS: dict[tuple[str, tuple[int, ...]], int] = {}


def count_flops(cfg: ModelConfig, window: Sequence[int]) -> int:
    """FLOPs (2 per multiply-add) of one network call on one window, counted on the meta device."""
    key = (cfg.to_json(), tuple(int(w) for w in window))
    if key not in _FLOPS:
        _FLOPS[key] = _count_flops(cfg, key[1])
    return _FLOPS[key]


def _count_flops(cfg: ModelConfig, window: tuple[int, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        predictor = NoisePredictor(FoundationUNet(cfg)).eval()
        inputs = _window_inputs(cfg, tuple(window), 1, torch.device("meta"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        predictor(*_call_args(predictor, inputs))
    return int(counter.get_total_flops())


def _window_inputs(cfg: ModelConfig, window: tuple[int, ...], batch: int, device: torch.device) -> dict:
    return {"x_t": torch.randn(batch, 1, *window, device=device),
            "t": torch.full((batch,), cfg.num_train_timesteps // 2, dtype=torch.long, device=device),
            "coords": torch.rand(batch, 3, *window, device=device) * 2 - 1,
            "anatomy_channels": torch.zeros(batch, cfg.anatomy_channels, *window, device=device),
            "region": torch.full((batch,), REGION_INDEX["abdomen"], dtype=torch.long, device=device),
            "spacing": torch.full((batch, 3), float(cfg.spacing_mm), device=device)}


def _call_args(predictor, inputs: dict) -> tuple:
    """Positional arguments of ``NoisePredictor.forward``, which every predictor takes (spacing
    only where it has it)."""
    import inspect

    names = list(inspect.signature(NoisePredictor.forward).parameters)[1:]
    return tuple(inputs[n] for n in names if n in inputs)


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return torch.autocast("cpu", enabled=False)


def bare_network_seconds(predictor, window: Sequence[int], batch: int, device: torch.device, precision: str,
                         repeats: int = 2) -> float:
    """Seconds of one network call on ``batch`` windows whose inputs are already on the device
    (best of ``repeats`` after one warm-up call)."""
    inputs = _window_inputs(predictor.cfg, tuple(window), batch, device)
    args = _call_args(predictor, inputs)
    best = math.inf
    with torch.inference_mode(), _autocast(device, precision):
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            predictor(*args)
            _sync(device)
            if i > 0:
                best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------------------ one sampler step
class TimedPredictor(torch.nn.Module):
    """Forwards every call to ``predictor`` and adds up the seconds spent inside (the device
    synchronised before and after, so that queued work is charged to the right side)."""

    def __init__(self, predictor):
        super().__init__()
        self.inner = predictor
        self.cfg = predictor.cfg
        self.controlnet = getattr(predictor, "controlnet", None)
        self.seconds = 0.0
        self.calls = 0

    def forward(self, *args, **kwargs):
        device = args[0].device
        _sync(device)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        _sync(device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _sampler(predictor, device: torch.device, steps: int, batch_size: int, precision: str):
    from .sampling import PatchSampler, SamplerOptions

    return PatchSampler(predictor, SamplerOptions(steps=steps, batch_size=batch_size, precision=precision, seed=0),
                        device)


def window_layout(predictor, shape: Sequence[int], batch_size: int = 4) -> tuple[tuple[int, ...], int]:
    """(window size, window count) of one step over a volume of ``shape``."""
    win, _, slices = _sampler(predictor, torch.device("cpu"), 1, batch_size, "fp32").layout(tuple(shape))
    return tuple(win), len(slices)


def sampler_step_seconds(predictor, shape: Sequence[int], spacing_mm: Sequence[float], device: torch.device,
                         steps: int, batch_size: int, precision: str) -> tuple[float, float]:
    """(seconds per step, of which inside the network) of the patch sampler over a whole volume
    (``steps`` steps from noise, region "abdomen", no anatomy), averaged; includes drawing the
    initial noise."""
    from .sampling import Condition

    timed = TimedPredictor(predictor)
    sampler = _sampler(timed, device, steps, batch_size, precision)
    _sync(device)
    t0 = time.perf_counter()
    sampler.sample(tuple(shape), Condition(region=REGION_INDEX["abdomen"]))
    _sync(device)
    return (time.perf_counter() - t0) / steps, timed.seconds / steps


# ------------------------------------------------------------------------------ report rows
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
        from . import onnx_backend

        onnx_backend.require_onnxruntime(export=True)
    except RuntimeError:
        return None
    with tempfile.TemporaryDirectory(prefix="meddifffm-speed-") as tmp:
        if model_dir is None:
            from .checkpoint import save_model

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
    from . import io, preprocessing, resample
    from .geometry import make_ijk_to_ras, regrid
    from .volume import Volume

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


# ------------------------------------------------------------------------------ the run
def _demo_predictor(device: torch.device) -> tuple[Path, NoisePredictor]:
    from . import weights
    from .checkpoint import load_base

    model_dir = Path(weights.resolve_model(None, kind="base"))
    return model_dir, NoisePredictor(load_base(model_dir, device)).eval()


def _random_predictor(name: str, device: torch.device, seed: int = 0) -> NoisePredictor:
    if device.type == "meta":  # shapes only (window layouts, FLOP counts)
        with torch.device("meta"):
            return NoisePredictor(FoundationUNet(preset(name))).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return NoisePredictor(FoundationUNet(preset(name))).to(device).eval()


def run_speed(*, quick: bool = False, device: str = "auto", steps: int = 1, batch_size: int = 4,
              precision: str = "auto", peak_tflops: Optional[float] = None, base: Optional[bool] = None,
              max_windows: Optional[int] = None, log=print) -> SpeedReport:
    """Measure everything the module docstring lists.

    Args:
        quick: the tiny test network on small volumes (seconds, for CI).
        steps: sampling steps per measured row (the time is per step).
        precision: "auto" (bf16 on CUDA, fp32 on the CPU), "fp32" or "bf16".
        base: run the base preset on 350 x 350 x 300 (default: only on a GPU).
        max_windows: run the sampler only on volumes of at most this many windows per step.
        log: called with one line per finished measurement.
    """
    from .tasks.common import resolve_device

    dev = resolve_device(device)
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    report = SpeedReport(str(dev) if dev.type != "cuda" else f"{dev} ({torch.cuda.get_device_name(dev)})",
                         torch.get_num_threads(), torch.__version__)
    gpu, peak = gpu_peak(dev, peak_tflops)
    if quick:
        name, predictor = "tiny (random)", _random_predictor("tiny", dev)
        sizes = [((16, 16, 16), (1.0, 1.0, 1.0)), ((20, 40, 36), (2.5, 0.7, 0.7))]
        io_shape, io_spacing = (20, 64, 64), CLINICAL_SPACING
    else:
        model_dir, predictor = _demo_predictor(dev)
        name = model_dir.name
        sizes = [((64, 64, 64), (1.0, 1.0, 1.0)), ((64, 128, 128), (2.5, 0.7, 0.7)),
                 ((139, 256, 256), CLINICAL_SPACING), (CLINICAL_SHAPE, CLINICAL_SPACING)]
        io_shape, io_spacing = CLINICAL_SHAPE, CLINICAL_SPACING
    for shape, spacing in sizes:
        row = measure_step(name, predictor, shape, spacing, dev, steps=steps, batch_size=batch_size,
                           precision=precision, max_windows=max_windows)
        report.steps.append(row)
        if row.step_s is None:
            report.notes.append(f"{name} on {shape}: sampler step not run ({row.windows} windows > --max-windows "
                                f"{max_windows}); its bare network time is {row.bare_network_s:.1f} s per step")
        log(f"  step {name} {shape}: {row.step_s} s ({row.windows} windows)")
    base_cfg = preset("tiny" if quick else "base")
    base_shape = (16, 24, 20) if quick else BASE_SHAPE
    measured = None
    run_base = dev.type == "cuda" if base is None else base
    if run_base:
        base_predictor = _random_predictor(base_cfg.name, dev)
        row = measure_step(f"{base_cfg.name} (random)", base_predictor, base_shape, BASE_SPACING, dev, steps=steps,
                           batch_size=batch_size, precision=precision)
        report.steps.append(row)
        measured = row.step_s
        log(f"  step {base_cfg.name} {base_shape}: {row.step_s:.3f} s ({row.windows} windows)")
        del base_predictor
    else:
        report.notes.append(f"{base_cfg.name} preset on {base_shape}: not measured here (no GPU); on a GPU run: "
                            "python -m MedDiffFMLib.speed --device cuda")
    layout_predictor = _random_predictor(base_cfg.name, torch.device("meta")) if not quick else predictor
    report.floors.append(flop_floor(base_cfg.name, base_cfg, layout_predictor, base_shape, gpu, peak, measured))
    report.io.extend(io_rows(io_shape, io_spacing, quick))
    log("  resampling and writing done")
    row = backend_row(name, None if quick else model_dir, predictor, device, batch_size, precision)
    if row is None:
        report.notes.append("onnx backend: not measured (pip install 'meddiff-fm[onnx]')")
    else:
        report.backends.append(row)
    return report


# ------------------------------------------------------------------------------ output
def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, tuple):
            return "x".join(str(int(x)) if float(x).is_integer() else f"{x:g}" for x in v)
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def format_report(report: SpeedReport) -> str:
    """Markdown tables of a :class:`SpeedReport`."""
    parts = [f"Device {report.device}, {report.threads} CPU thread(s), torch {report.torch_version}.", "",
             "Sampling steps (seconds per step; network = inside the network calls of the step, machinery = "
             "the rest; bare network = the same windows from one batch of pre-built inputs; memory in MiB):", "",
             _table(("model", "volume (k, j, i)", "mm", "windows", "step s", "network s", "machinery s",
                     "machinery %", "bare network s", "host peak MiB", "x volume", "device peak MiB", "TFLOP/s"),
                    [(r.model, r.shape, r.spacing_mm, r.windows, r.step_s, r.network_s, r.machinery_s,
                      round(100 * r.machinery_s / r.step_s, 1) if r.step_s else None, r.bare_network_s,
                      r.peak_host_mib,
                      round(r.peak_host_mib / r.volume_mib, 2) if r.peak_host_mib is not None and r.volume_mib else None,
                      r.peak_device_mib, r.achieved_tflops) for r in report.steps]),
             "", "FLOP floor of 50 steps (bf16 peak of the GPU):", "",
             _table(("model", "volume", "windows", "TFLOP/window", "TFLOP/step", "GPU", "peak TFLOP/s",
                     "floor s/step", "floor 50 steps s", "measured 50 steps s", "target s"),
                    [(f.model, f.shape, f.windows, f.tflop_per_window, f.tflop_per_step, f.gpu, f.peak_tflops,
                      f.floor_step_s, f.floor_50_steps_s, f.measured_50_steps_s, f.target_50_steps_s)
                     for f in report.floors]),
             "", "Resampling and writing (same data, same run):", "",
             _table(("operation", "voxels", "before", "s", "after", "s", "speed-up", "note"),
                    [(r.operation, r.voxels, r.before, r.before_s, r.after, r.after_s,
                      f"{r.before_s / r.after_s:.1f}x" if r.after_s else None, r.detail) for r in report.io])]
    if report.backends:
        parts += ["", "Network backends (one call on one batch of full windows, same inputs):", "",
                  _table(("model", "window", "batch", "torch s", "onnx s", "onnx providers", "max |difference|"),
                         [(b.model, b.window, b.batch_size, b.torch_s, b.onnx_s, b.onnx_providers, b.max_abs_diff)
                          for b in report.backends])]
    if report.notes:
        parts += [""] + [f"Note: {n}" for n in report.notes]
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m MedDiffFMLib.speed", description=__doc__.split("\n\n")[0],
                                epilog="Full run on a GPU: python -m MedDiffFMLib.speed --device cuda --json speed.json")
    p.add_argument("--quick", action="store_true", help="tiny network and small volumes (seconds; CI)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--steps", type=int, default=1, help="sampling steps per row (default 1)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per network call (default 4)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's peak bf16 TFLOP/s for the floor "
                                                                   "(default: from its name)")
    p.add_argument("--base", action=argparse.BooleanOptionalAction, default=None,
                   help="time the base preset on 350x350x300 (default: only on a GPU)")
    p.add_argument("--max-windows", type=int, default=None, help="run the sampler only on volumes of at most this "
                   "many windows per step (the others keep their network time; default: all)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: see meddiff-fm --threads)")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .threads import set_threads

    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    report = run_speed(quick=args.quick, device=args.device, steps=args.steps, batch_size=args.batch_size,
                       precision=args.precision, peak_tflops=args.peak_tflops, base=args.base,
                       max_windows=args.max_windows, log=lambda line: print(line, file=sys.stderr))
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
