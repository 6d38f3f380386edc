"""``meddiff-fm benchmark``: the arguments and the command."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .options import (FAMILIES, FOV_MM, NOISE_LEVELS_HU, QUICK_FOV_MM, SECTIONS, SEED_START, SUPERRES_FACTORS,
                      BenchmarkOptions, parse_steps)

DESCRIPTION = ("Every task on phantoms at clinical grids (0.6-0.9 mm in-plane, 1-5 mm slices, oblique), side by side "
               "with classical baselines in one run: the independent held-out family, and the training family as "
               "its own section. Prints the table (mean ± std over cases), writes JSON and optionally Markdown.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="foundation model directory or registry id (default: the registry's)")
    p.add_argument("--superres-controlnet", default=None, help="superres ControlNet (default: the registered one)")
    p.add_argument("--lesion-controlnet", default=None, help="lesion ControlNet for inpainting and lesion generation "
                   "(default: the registered one)")
    p.add_argument("--cases", type=int, default=5, help="cases per section and family, regions cycling "
                   "(default 5); synthesis runs this many of every region")
    p.add_argument("--families", default=",".join(FAMILIES), help="heldout,training (default both)")
    p.add_argument("--seed-start", type=int, default=SEED_START, help=f"first case seed (default {SEED_START})")
    p.add_argument("--sections", "--tasks", dest="sections", default=",".join(SECTIONS),
                   help="comma-separated sections (default all six)")
    p.add_argument("--steps", nargs="+", default=None, metavar="N|SECTION=N",
                   help="reverse steps: one number for every section, or per section (denoise=2 anomaly=10 ...)")
    p.add_argument("--fov", type=float, nargs=3, default=FOV_MM, metavar=("K_MM", "J_MM", "I_MM"),
                   help=f"field of view of every case grid in mm (default {' '.join(f'{f:g}' for f in FOV_MM)})")
    p.add_argument("--noise-levels", type=float, nargs="+", default=NOISE_LEVELS_HU, help="denoising noise, HU")
    p.add_argument("--superres-factors", type=int, nargs="+", default=SUPERRES_FACTORS, help="slice factors (2-6)")
    p.add_argument("--quick", action="store_true", help="a small smoke run: 1 case, held-out family, a "
                   f"{' x '.join(f'{f:g}' for f in QUICK_FOV_MM)} mm field of view, one step per section, one noise "
                   "level and factor")
    p.add_argument("--no-bm4d", action="store_true", help="skip BM4D even when the bm4d package is installed")
    p.add_argument("--no-nlm", action="store_true", help="skip non-local means")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("-o", "--output", default="benchmark_results.json", help="JSON results (default "
                   "benchmark_results.json)")
    p.add_argument("--markdown", default=None, help="also write the table as Markdown here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def options_from_args(args: argparse.Namespace) -> BenchmarkOptions:
    if args.quick:
        return BenchmarkOptions(cases=1, families=("heldout",), seed_start=args.seed_start, sections=args.sections,
                                fov_mm=QUICK_FOV_MM, noise_levels_hu=(25.0,), superres_factors=(3,),
                                steps={s: 1 for s in SECTIONS}, device=args.device, bm4d=not args.no_bm4d,
                                nlm=not args.no_nlm, progress=not args.quiet)
    return BenchmarkOptions(cases=args.cases, families=args.families, seed_start=args.seed_start,
                            sections=args.sections, fov_mm=args.fov, noise_levels_hu=args.noise_levels,
                            superres_factors=args.superres_factors, steps=parse_steps(args.steps),
                            device=args.device, bm4d=not args.no_bm4d, nlm=not args.no_nlm, progress=not args.quiet)


def main(args: argparse.Namespace) -> int:
    from .report import format_markdown, format_table, write_json, write_text_atomic
    from .runner import run_benchmark

    try:
        opts = options_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "meddiff-fm benchmark " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else \
        "meddiff-fm benchmark"
    try:
        result = run_benchmark(args.model, superres_controlnet=args.superres_controlnet,
                               lesion_controlnet=args.lesion_controlnet, options=opts, command=command)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130
    written = [write_json(result, args.output)]
    if args.markdown:
        written.append(write_text_atomic(args.markdown, format_markdown(result)))
    print(format_table(result))
    print("\n" + "\n".join(f"wrote {Path(w)}" for w in written))
    return 0
