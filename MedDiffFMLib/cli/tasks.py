"""The six task commands (``meddiff-fm denoise ...``), built from the task registry.

Order of a run, so that every bad input is refused before any work: parameters (registry
bounds), output paths (:mod:`.outputs`), device, inputs read and checked
(:mod:`MedDiffFMLib.preflight`), model files checked, grid size and memory estimated, then
the task; outputs are checked to be finite and written all or none.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..tasks.registry import TaskSpec
from .errors import UsageError
from .options import add_spec_options, given_values
from .outputs import Planned, check_paths, plan, split_name, write_all

EPILOG = ("Outputs: the main result goes to --output (default: next to the input, named <input>_<task>.nii.gz); "
          "other results are written beside it as <output>_<name>.nii.gz. Every path is checked before the run; "
          "nothing is written when the run fails or is interrupted.")
_DEVICE = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")


def add_run_options(p: argparse.ArgumentParser) -> None:
    """--model, --device, --quiet and --max-memory-gb (every command that samples)."""
    p.add_argument("--model", default=None,
                   help="foundation model directory or registry id (default: the bundled demo weights)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--max-memory-gb", type=_positive_float, default=None,
                   help="refuse runs estimated to need more memory than this (default: 80%% of the device's)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not (value > 0 and np.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def check_device(text: str) -> str:
    """The device the run will use ("cpu", "cuda:N"); a one-line error for anything unusable."""
    m = _DEVICE.match((text or "auto").strip().lower())
    if m is None:
        raise UsageError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N")
    name = m.group(1)
    if name == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        if name == "auto":
            return "cpu"
        raise UsageError(f"device {text!r} requested but no CUDA GPU is available; use --device cpu")
    count = torch.cuda.device_count()
    index = int(m.group(2) or 0)
    if index >= count:
        raise UsageError(f"device {text!r} does not exist: this computer has {count} CUDA GPU(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    return f"cuda:{index}"


def add_task_command(sub, spec: TaskSpec) -> argparse.ArgumentParser:
    p = sub.add_parser(spec.name, help=spec.description, description=spec.description, epilog=EPILOG)
    if spec.needs_image:
        p.add_argument("input", help="input CT: NIfTI, NRRD, MetaImage file or DICOM series folder")
    else:
        p.add_argument("--reference", default=None, help="image whose grid the output takes (when no --anatomy)")
    p.add_argument("-o", "--output", default=None, help="main output file (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--region", default="auto" if spec.needs_image else None,
                   help="head_neck | chest | abdomen | auto (guess from the image)")
    if spec.accepts_anatomy:
        p.add_argument("--anatomy", default=None,
                       help="optional anatomy label map (TotalSegmentator classes; names from <file>.labels.json "
                            "or the TotalSegmentator v2 table)")
    if spec.needs_mask:
        p.add_argument("--mask", required=True,
                       help="lesion / inpainting mask, any numeric type: non-zero = inside (0/1, 0/255, 0/0.5 ...)")
    if spec.controlnet:
        p.add_argument("--controlnet", default=None,
                       help="ControlNet directory or registry id (default: the bundled one for this task)")
    add_run_options(p)
    add_spec_options(p.add_argument_group(f"{spec.name} parameters"), spec.params)
    p.set_defaults(func=lambda a, s=spec: run_task_command(a, s))
    return p


def _default_output(args, spec: TaskSpec) -> Path:
    given = getattr(args, "input", None) or getattr(args, "anatomy", None) or getattr(args, "reference", None)
    if args.output:
        return Path(args.output)
    if not given:
        return Path.cwd() / f"{spec.name}.nii.gz"
    src = Path(given)
    stem = split_name(src)[0] if not src.is_dir() else src.name
    return src.parent / f"{stem}_{spec.name}.nii.gz"


def _progress_bar(desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=1000, desc=desc, unit="‰", dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {postfix} [{elapsed}<{remaining}]")

    def update(p) -> None:
        bar.n = int(round(1000 * min(1.0, p.fraction)))
        bar.set_postfix_str(f"{p.stage} step {p.step}/{p.total_steps} window {p.window}/{p.total_windows}",
                            refresh=False)
        bar.refresh()

    return bar, update


def _grid_reference(request, params: dict, model_cfg: dict) -> tuple[tuple, tuple]:
    """(shape, spacing) (k, j, i) of the grid that sets the output's extent."""
    ref = request.image if request.image is not None else request.anatomy
    if ref is not None:
        return ref.shape, tuple(float(s) for s in ref.spacing_kji)
    shape = params.get("shape") or (model_cfg["window"],) * 3
    spacing = params.get("spacing") or (1.0,) * 3
    return tuple(shape), tuple(spacing)


def _read_inputs(args, spec: TaskSpec):
    from .. import io

    image = io.read_volume(args.input) if getattr(args, "input", None) else None
    if getattr(args, "reference", None):
        image = io.read_volume(args.reference)
    anatomy = names = None
    if getattr(args, "anatomy", None):
        anatomy, names = io.read_labelmap(args.anatomy)
    mask = io.read_mask(args.mask) if getattr(args, "mask", None) else None
    return dict(image=image, region=args.region, anatomy=anatomy, anatomy_names=names, mask=mask)


def run_task_command(args, spec: TaskSpec) -> int:
    from .. import preflight
    from ..tasks.registry import check_params

    # 1. parameters and paths: no file is read yet
    params = given_values(args, spec.params)
    try:
        check_params(spec.name, params)
    except ValueError as e:
        raise UsageError(str(e)) from None
    inputs = {"input": getattr(args, "input", None), "reference": getattr(args, "reference", None),
              "anatomy": getattr(args, "anatomy", None), "mask": getattr(args, "mask", None)}
    planned = plan(_default_output(args, spec), [(o.kind, o.name, o.primary) for o in spec.outputs])
    check_paths(planned, inputs)

    # 2. model files (no torch yet: config.json schema, safetensors layout, checksum), inputs, device
    from .. import weights
    from ..modelformat import read_config_file
    from ..tasks import TaskRequest

    model_dir = weights.resolve_model(args.model, kind="base")
    weights.verify(model_dir)
    model_cfg = read_config_file(model_dir / weights.CONFIG_NAME)
    step = 2 ** (len(model_cfg["channels"]) - 1)  # the U-Net halves the window this often
    if params.get("window") and params["window"] % step:
        raise UsageError(f"parameter '--window' must be a multiple of {step} for this model "
                         f"({len(model_cfg['channels'])} levels), got {params['window']}")
    controlnet_dir = None
    if spec.controlnet:
        controlnet_dir = weights.resolve_model(getattr(args, "controlnet", None), kind="controlnet",
                                               task=spec.controlnet)
        weights.verify(controlnet_dir)
        trained_for = read_config_file(controlnet_dir / weights.CONFIG_NAME)["task"]
        if trained_for != spec.controlnet:
            raise UsageError(f"the ControlNet in {controlnet_dir} was trained for {trained_for!r}; task "
                             f"{spec.name!r} needs a {spec.controlnet!r} ControlNet")
    request = TaskRequest(params=params, **_read_inputs(args, spec))
    preflight.check_request(spec.name, request)
    for warning in preflight.request_warnings(spec.name, request):
        print(f"warning: {warning}", file=sys.stderr)
    device = check_device(args.device)
    shape, spacing = _grid_reference(request, params, model_cfg)
    # the model runs on the input's own grid (it is conditioned on voxel size)
    voxels = preflight.grid_voxels(spec.name, shape, spacing, None, params)
    preflight.check_memory(voxels, device, args.max_memory_gb)

    # 3. the run
    from .. import tasks

    bar, update = (None, None) if args.quiet else _progress_bar(spec.name)
    t0 = time.monotonic()
    try:
        result = tasks.run_task(spec.name, request, model_dir, controlnet=controlnet_dir, device=device,
                                progress=update)
    finally:
        if bar is not None:
            bar.close()

    # 4. outputs: checked, then written all or none
    files = _result_files(result, planned, spec)
    written = write_all(files)
    for m in result.messages:
        print(f"note: {m}")
    print(f"{spec.name}: {result.summary} [{time.monotonic() - t0:.1f} s]")
    for p in written:
        print(f"  wrote {p}")
    if result.scores:
        print("  scores: " + json.dumps({k: round(v, 4) for k, v in result.scores.items()}))
    return 0


def _result_files(result, planned: list[Planned], spec: TaskSpec) -> list:
    from ..volume import Volume

    produced = {("volume", k): v for k, v in result.volumes.items()}
    produced.update({("segmentation", k): v for k, v in result.segmentations.items()})
    unplanned = sorted(set(produced) - {p.key for p in planned})
    if unplanned:
        raise RuntimeError(f"task {spec.name!r} returned outputs its registry entry does not list: {unplanned}")
    files = []
    for out in planned:
        vol: Optional[Volume] = produced.get(out.key)
        if vol is None:
            continue
        arr = np.asarray(vol.array)
        if out.key[0] == "segmentation":
            vol = Volume(arr.astype(np.uint8), vol.ijk_to_ras)
        elif not np.all(np.isfinite(arr)):
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise RuntimeError(f"the {out.key[1]} result has {bad} NaN or infinite voxels (damaged weights or a "
                               "numerical failure); nothing written")
        files.append((out.path, vol, None))
    return files
