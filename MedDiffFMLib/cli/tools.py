"""``phantom``, ``demo`` and ``benchmark``: test data, a guided tour and measurements."""

from __future__ import annotations

from pathlib import Path

from ..tasks.registry import ParamSpec
from .errors import UsageError
from .options import add_spec_options, all_values
from .outputs import Planned, beside, check_paths, output_extension, write_all
from .tasks import add_run_options, check_device

PHANTOM_OPTIONS = {
    "shape": ParamSpec(int, (48, 64, 64), "voxels along k, j, i", minimum=4, maximum=1024, length=3),
    "spacing": ParamSpec(float, (4.0, 4.0, 4.0), "voxel size along k, j, i (4 4 4 is the demo model's grid)",
                         minimum=0.05, maximum=20.0, length=3, unit="mm"),
    "seed": ParamSpec(int, 100_000, "phantom seed (training uses seeds below 10 000)", minimum=0, maximum=2**31 - 1),
    "lesions": ParamSpec(int, 0, "number of inserted lesions", minimum=0, maximum=50),
    "noise": ParamSpec(float, 12.0, "CT noise standard deviation", minimum=0.0, maximum=500.0, unit="HU"),
}
# A phantom is made in memory as a few float arrays: refuse sizes that cannot be meant.
MAX_PHANTOM_VOXELS = 256 * 1024 * 1024


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="denoising, anomaly detection and super-resolution on a held-out phantom",
                       description="Runs three tasks with the bundled demo weights on held-out phantoms and writes "
                                   "NIfTI outputs and PNG previews.")
    p.add_argument("--output", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--seed", type=int, default=100_001, help="phantom seed (held out from training)")
    add_run_options(p)
    p.set_defaults(func=cmd_demo)

    from ..benchmark.cli import DESCRIPTION as BENCHMARK_DESCRIPTION
    from ..benchmark.cli import add_arguments as add_benchmark_arguments

    p = sub.add_parser("benchmark", help="measure every task at clinical grids against classical baselines",
                       description=BENCHMARK_DESCRIPTION)
    add_benchmark_arguments(p)
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("phantom", help="write a synthetic CT phantom (image, labels, lesion mask)")
    p.add_argument("--region", default="abdomen", choices=("head_neck", "chest", "abdomen"),
                   help="body region (default abdomen)")
    add_spec_options(p, PHANTOM_OPTIONS)
    p.add_argument("-o", "--output", required=True,
                   help="image file; labels and lesion mask are written beside it (<name>_labels, <name>_lesions)")
    p.set_defaults(func=cmd_phantom)


def cmd_phantom(args) -> int:
    import math

    from .. import io
    from ..volume import Volume

    opts = all_values(args, PHANTOM_OPTIONS)
    if math.prod(opts["shape"]) > MAX_PHANTOM_VOXELS:
        raise UsageError(f"--shape {' '.join(map(str, opts['shape']))} is {math.prod(opts['shape']) / 1e6:.0f} million "
                         f"voxels; at most {MAX_PHANTOM_VOXELS / 1e6:.0f} million")
    out = Path(args.output)
    ext = output_extension(out)
    lab = beside(out, "labels", ext)
    les = beside(out, "lesions", ext)
    planned = [Planned(out, "--output"), Planned(lab, "the label map"),
               Planned(io.label_sidecar_path(lab), "the label names"), Planned(les, "the lesion mask")]
    check_paths(planned, {})
    from ..phantoms import make_phantom

    ph = make_phantom(args.region, shape_kji=tuple(opts["shape"]), spacing_kji=tuple(opts["spacing"]),
                      seed=opts["seed"], lesions=opts["lesions"], noise_hu=opts["noise"])
    files = [(out, ph.volume(), None), (lab, ph.label_volume(), ph.label_names)]
    if ph.lesion_mask.any():
        files.append((les, Volume(ph.lesion_mask.astype("uint8"), ph.ijk_to_ras), None))
    write_all(files)
    print(f"phantom: {args.region}, seed {opts['seed']}, shape (k, j, i) {tuple(opts['shape'])}, "
          f"spacing {tuple(opts['spacing'])} mm, {int(ph.lesion_mask.any() and opts['lesions'])} lesion set(s)")
    for p, _, _ in files:
        print(f"  wrote {p}")
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {str(out)!r} is a file; the demo writes a folder")
    run_demo(args.output, model=args.model, device=check_device(args.device), seed=args.seed,
             progress=not args.quiet)
    return 0


def cmd_benchmark(args) -> int:
    from .. import benchmark

    return benchmark.main(args)
