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

from pathlib import Path
from typing import Optional

import torch

from ..networks import FoundationUNet, NoisePredictor, preset
from .measure import TimedPredictor, bare_network_seconds, count_flops, sampler_step_seconds, window_layout
from .report import build_parser, format_report, main
from .rows import (PEAK_BF16_TFLOPS, REFERENCE_GPU, TARGET_50_STEPS_S, BackendRow, FloorRow, IORow, SpeedReport,
                   StepRow, backend_row, flop_floor, gpu_peak, io_rows, measure_step)

__all__ = ["run_speed", "main", "format_report", "build_parser", "count_flops", "measure_step", "window_layout",
           "bare_network_seconds", "sampler_step_seconds", "TimedPredictor", "SpeedReport", "StepRow", "FloorRow",
           "IORow", "BackendRow", "flop_floor", "gpu_peak", "io_rows", "backend_row", "PEAK_BF16_TFLOPS",
           "REFERENCE_GPU", "TARGET_50_STEPS_S"]

CLINICAL_SHAPE = (139, 512, 512)  # (k, j, i)
CLINICAL_SPACING = (2.5, 0.7, 0.7)  # mm
BASE_SHAPE = (300, 350, 350)
BASE_SPACING = (1.0, 1.0, 1.0)


def _demo_predictor(device: torch.device) -> tuple[Path, NoisePredictor]:
    from .. import weights
    from ..checkpoint import load_base

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
    from ..tasks.common import resolve_device

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
