"""``train`` (pretrain the foundation model) and ``finetune`` (a task ControlNet)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from ..tasks.registry import ParamSpec
from .errors import UsageError
from .options import add_spec_options, all_values
from .outputs import _probe_writable
from .tasks import check_device

# Training options with their bounds: parsed and checked like task parameters.
DATA_OPTIONS = {
    "phantoms": ParamSpec(int, 0, "train on this many synthetic phantoms instead of (or besides) --data",
                          minimum=0, maximum=1_000_000),
    "phantom_seed": ParamSpec(int, 0, "first phantom seed", minimum=0, maximum=2**31 - 1),
    "phantom_family": ParamSpec(str, "adult", "adult: a sub-box of an adult-sized body on an oblique grid; miniature: "
                                             "the whole body scaled into --phantom-fov", ("adult", "miniature")),
    "phantom_fov": ParamSpec(float, (192.0, 256.0, 256.0), "miniature phantoms' field of view (k, j, i)", minimum=16.0,
                             maximum=2000.0, length=3, unit="mm"),
    "phantom_max_voxels": ParamSpec(int, 1_000_000, "phantoms: at most this many voxels per case", minimum=4096,
                                    maximum=512 * 1024 * 1024),
    "phantom_noise": ParamSpec(float, 0.0, "CT noise in training phantoms (0: learn clean anatomy)", minimum=0.0,
                               maximum=500.0, unit="HU"),
}
RUN_OPTIONS = {
    "steps": ParamSpec(int, 1000, "total optimizer steps", minimum=1, maximum=10_000_000),
    "batch_size": ParamSpec(int, 2, "samples per process per micro-step", minimum=1, maximum=1024),
    "grad_accum": ParamSpec(int, 1, "micro-steps per optimizer step", minimum=1, maximum=1024),
    "lr": ParamSpec(float, 1e-4, "AdamW learning rate", minimum=0.0, exclusive_minimum=True, maximum=1.0),
    "weight_decay": ParamSpec(float, 0.0, "AdamW weight decay", minimum=0.0, maximum=1.0),
    "ema_decay": ParamSpec(float, 0.999, "EMA decay of the saved weights", minimum=0.0, maximum=0.999999),
    "checkpoint_every": ParamSpec(int, 500, "save every N steps", minimum=1, maximum=10_000_000),
    "max_minutes": ParamSpec(float, None, "stop (and save) after this wall time", minimum=0.0,
                             exclusive_minimum=True, maximum=1e6, unit="min"),
    "seed": ParamSpec(int, 0, "seed for weights init, sampling and noise", minimum=0, maximum=2**31 - 1),
    "precision": ParamSpec(str, "auto", "auto = bf16 autocast on CUDA GPUs that support it, else fp32",
                           ("auto", "fp32", "bf16")),
    "p_drop_region": ParamSpec(float, 0.15, "region-condition dropout", minimum=0.0, maximum=1.0),
    "p_drop_anatomy": ParamSpec(float, 0.15, "anatomy-condition dropout", minimum=0.0, maximum=1.0),
}
MODEL_OPTIONS = {
    "window": ParamSpec(int, None, "override the preset's window edge (voxels)", minimum=8, maximum=512),
    "spacing_range": ParamSpec(float, None, "override the voxel sizes the model is trained for (the condition is "
                                            "clamped to them), min and max", minimum=0.05, maximum=20.0, length=2,
                               unit="mm"),
}
FINETUNE_OPTIONS = {
    "lesions": ParamSpec(int, 3, "lesion: lesions per training phantom", minimum=1, maximum=50),
    "thin_slice_mm": ParamSpec(float, 0.0, "superres: training phantoms have slices of at most this, the thin "
                                           "targets (0 = the default limit; recorded in the ControlNet's config)",
                               minimum=0.0, maximum=8.0, unit="mm"),
}


def _add_train_args(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="folder of CT images (labels of the same name in <folder>/labels/) or a JSON manifest "
                           "[{\"image\": ..., \"labels\": ..., \"region\": ...}]")
    data.add_argument("--region", default=None, help="region for cases the manifest does not label "
                                                     "(default: guessed per image)")
    add_spec_options(data, DATA_OPTIONS)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="output folder: model/ (inference weights), training_state/, log")
    run.add_argument("--resume", action="store_true", help="continue exactly from <out>/training_state")
    run.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                     help="start from an earlier network's weights where they fit (a foundation model for train, a "
                          "ControlNet of the same task for finetune; new input channels start at 0)")
    add_spec_options(run, RUN_OPTIONS)
    run.add_argument("--device", default="auto", help="auto | cpu | cuda (under torchrun: the local rank's GPU)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="pretrain the foundation model (single process or torchrun DDP)",
                       description="Pretrain the foundation model with multi-level samples, L1 on epsilon, cosine "
                                   "schedule (T = 1000), AdamW, EMA. Multi-GPU / multi-node: "
                                   "torchrun --nproc_per_node N -m MedDiffFMLib.cli train ...")
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="small", choices=("base", "small", "tiny"),
                       help="network size: base (the paper's, 128^3 windows at 1 mm), small (CPU demo), tiny (tests)")
    add_spec_options(model, MODEL_OPTIONS)
    model.add_argument("--channels", type=int, nargs="+", default=None, help="override the channels per level")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a task ControlNet (superres or lesion) on a frozen base",
                       description="Fine-tune a task ControlNet: a trainable copy of the base encoder with zero "
                                   "convolutions; the base stays frozen. Same machinery as train (EMA, resume, DDP).")
    p.add_argument("--base", default=None, help="base model directory or registry id (default: the bundled demo)")
    p.add_argument("--task", required=True, choices=("superres", "lesion"), help="which ControlNet")
    p.add_argument("--factors", nargs="+", default=(2, 3, 4, 5, 6), metavar="F",
                   help="superres: slab factors along k drawn per sample, 2 to 6 (default 2 3 4 5 6)")
    add_spec_options(p, FINETUNE_OPTIONS)
    _add_train_args(p)
    p.set_defaults(func=cmd_finetune)


def _values(args, *groups) -> argparse.Namespace:
    """The namespace with every spec option checked and filled in."""
    for specs in groups:
        for name, value in all_values(args, specs).items():
            setattr(args, name, value)
    return args


def _check_out(args) -> None:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; give a folder")
    folder = out if out.is_dir() else out.parent
    if not folder.is_dir():
        raise UsageError(f"the folder of --out {str(out)!r} does not exist: {str(folder)!r}")
    reason = _probe_writable(folder)
    if reason is not None:
        raise UsageError(f"cannot write --out {str(out)!r}: {str(folder)!r} is not writable ({reason})")
    if args.device not in (None, "auto"):
        check_device(args.device)


def _train_options(args):
    from ..training import TrainOptions

    return TrainOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                        ema_decay=args.ema_decay, grad_accum=args.grad_accum, checkpoint_every=args.checkpoint_every,
                        seed=args.seed, precision=args.precision, p_drop_region=args.p_drop_region,
                        p_drop_anatomy=args.p_drop_anatomy, max_minutes=args.max_minutes,
                        progress=not args.no_progress)


def _model_config(args):
    from ..networks import preset

    overrides = {}
    if args.window:
        overrides["window"] = args.window
    if args.spacing_range:
        lo, hi = args.spacing_range
        if lo > hi:
            raise UsageError(f"--spacing-range must be MIN_MM MAX_MM with MIN_MM <= MAX_MM, got {lo:g} {hi:g}")
        overrides["spacing_range_mm"] = tuple(args.spacing_range)
    if args.channels:
        if min(args.channels) < 1:
            raise UsageError(f"--channels must be positive whole numbers, got {args.channels}")
        overrides["channels"] = tuple(args.channels)
        overrides.setdefault("attention_levels", tuple([False] * (len(args.channels) - 1) + [True]))
    return preset(args.preset, **overrides)


def cmd_train(args) -> int:
    _values(args, DATA_OPTIONS, RUN_OPTIONS, MODEL_OPTIONS)
    _check_out(args)
    from ..training import Trainer

    cfg = _model_config(args)
    if args.resume and (Path(args.out) / "model" / "config.json").exists():
        from ..checkpoint import network_config, read_config
        from ..networks import ModelConfig

        cfg = ModelConfig.from_dict(network_config(read_config(Path(args.out) / "model")))
    _check_init_from(args)
    cases = _image_cases(args, cfg)
    if not cases:
        raise UsageError("no training data: give --data and/or --phantoms N")
    trainer = Trainer(cases, args.out, _train_options(args), cfg, device=args.device)
    return _train(trainer, args, "train")


def _check_init_from(args) -> None:
    if args.init_from and not (Path(args.init_from) / "model.safetensors").is_file():
        raise UsageError(f"--init-from {args.init_from!r} is not a model folder (no model.safetensors)")


def _train(trainer, args, what: str) -> int:
    """Resume (or warm-start) if asked, train, and print one summary line on the main process."""
    if args.resume:
        trainer.resume()
    elif args.init_from:
        from safetensors.torch import load_file

        from ..training import warm_start

        fresh = warm_start(trainer.model, load_file(str(Path(args.init_from) / "model.safetensors")))
        trainer.ema = {k: v.detach().clone().float() for k, v in trainer.model.state_dict().items()}
        print(f"initialised from {args.init_from} ({len(fresh)} tensors kept fresh)")
    losses = trainer.train()
    trainer.close()
    if trainer.dist.main:
        tail = losses[-min(len(losses), 20):] if losses else [float("nan")]
        print(f"{what}: {trainer.step} steps, mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f}; "
              f"model in {Path(args.out) / 'model'}")
    return 0


def _image_cases(args, cfg, thin_slice_mm: Optional[float] = None) -> list:
    """Cases from --data and/or --phantoms (image-only training data)."""
    from ..training import manifest_cases, phantom_cases

    cases = []
    if args.data:
        cases += manifest_cases(args.data, cfg, args.region)
    if args.phantoms:
        cases += phantom_cases(args.phantoms, cfg, noise_hu=args.phantom_noise, thin_slice_mm=thin_slice_mm,
                               **_phantom_options(args))
    return cases


def _phantom_options(args) -> dict:
    """What every phantom source takes from the --phantom-* options."""
    return {"seed": args.phantom_seed, "fov_mm": args.phantom_fov, "max_voxels": args.phantom_max_voxels,
            "family": args.phantom_family}


def cmd_finetune(args) -> int:
    _values(args, DATA_OPTIONS, RUN_OPTIONS, FINETUNE_OPTIONS)
    factors = _factors(args.factors) if args.task == "superres" else ()
    _check_out(args)
    _check_init_from(args)
    from ..checkpoint import load_base, sha256_file
    from ..conditions import CONTROL_CHANNELS, SUPERRES_INTERPOLATION_TRAINED
    from ..finetune import THIN_SLICE_MM, lesion_phantom_cases, superres_cases
    from ..networks import ControlNetConfig
    from ..tasks.common import resolve_model_dir
    from ..training import Trainer

    base_dir = resolve_model_dir(args.base, kind="base")
    base = load_base(base_dir)
    cfg = base.cfg
    params = {}
    if args.task == "superres":
        params["factors"] = list(factors)
        params["interpolation"] = SUPERRES_INTERPOLATION_TRAINED
        params["thin_slice_mm"] = args.thin_slice_mm or THIN_SLICE_MM
        cases = superres_cases(_image_cases(args, cfg, thin_slice_mm=params["thin_slice_mm"]), factors,
                               params["interpolation"])
    else:
        cases = []
        if args.data:
            cases += _lesion_manifest(args.data, cfg, args.region)
        if args.phantoms:
            cases += lesion_phantom_cases(args.phantoms, cfg, lesions=args.lesions, **_phantom_options(args))
    if not cases:
        raise UsageError("no training data: give --data and/or --phantoms N")
    cn_cfg = ControlNetConfig(task=args.task, control_channels=CONTROL_CHANNELS[args.task], base=cfg,
                              base_sha256=sha256_file(base_dir / "model.safetensors"), params=params)
    trainer = Trainer(cases, args.out, _train_options(args), cfg, device=args.device, base=base,
                      controlnet_cfg=cn_cfg)
    return _train(trainer, args, f"finetune ({args.task})")


def _factors(text) -> tuple[int, ...]:
    """``--factors``: whole numbers 2 to 6 (given as several values or one text)."""
    items = text.split() if isinstance(text, str) else list(text)
    try:
        factors = tuple(int(f) for f in items)
    except ValueError:
        raise UsageError(f"--factors must be whole numbers 2 to 6, got {text!r}") from None
    if not factors or any(f < 2 or f > 6 for f in factors):
        raise UsageError(f"--factors must be whole numbers 2 to 6, got {text!r}")
    return factors


def _lesion_manifest(manifest, cfg, region):
    """Lesion pairs from a JSON manifest [{"image": ..., "mask": ..., "labels": ..., "region": ...}]."""
    from .. import io
    from ..finetune import lesion_cases_from_arrays

    path = Path(manifest)
    if not path.is_file():
        raise UsageError("--data for lesion fine-tuning must be a JSON manifest with 'image' and 'mask'")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise UsageError(f"{path} must hold a JSON list of {{\"image\": ..., \"mask\": ...}} entries")
    cases = []
    for e in entries:
        if not isinstance(e, dict) or "image" not in e or "mask" not in e:
            raise UsageError(f"manifest entry needs 'image' and 'mask': {e}")
        img = io.read_volume(path.parent / e["image"])
        mask = io.read_mask(path.parent / e["mask"])
        labels = names = None
        if e.get("labels"):
            lv, names = io.read_labelmap(path.parent / e["labels"])
            labels = lv.array
        cases.append(lesion_cases_from_arrays(img.array, img.ijk_to_ras, mask.array, e.get("region", region),
                                              cfg, labels, names, name=e["image"]))
    return cases
