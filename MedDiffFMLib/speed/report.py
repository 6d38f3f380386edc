"""The speed report as Markdown tables, and the command line."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from .rows import SpeedReport


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
    p = argparse.ArgumentParser(prog="python -m MedDiffFMLib.speed", description="Speed benchmark: where a sampling step's time and memory go, side by side in one run.",
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
    from ..threads import set_threads
    from . import run_speed

    args = build_parser().parse_args(argv)
    set_threads(args.threads)
    report = run_speed(quick=args.quick, device=args.device, steps=args.steps, batch_size=args.batch_size,
                       precision=args.precision, peak_tflops=args.peak_tflops, base=args.base,
                       max_windows=args.max_windows, log=lambda line: print(line, file=sys.stderr))
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1) + "\n", encoding="utf-8")
    return 0

