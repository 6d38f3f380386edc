"""``meddiff-fm``: the library's tasks, training and tools from a shell.

Every task command reads an image (NIfTI, NRRD, MetaImage or a DICOM folder), runs the same
``run_task`` the Slicer module runs, writes its outputs (NIfTI or NRRD, by extension) and
prints one summary line. Nothing is written when a run fails or is interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

EPILOG_TASK = ("Outputs: the main result goes to --output (default: next to the input, named "
               "<input>_<task>.nii.gz); other results are written beside it as <output>_<name>.nii.gz.")


# ----------------------------------------------------------------------- helpers
def _stem(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def _ext(path: Path) -> str:
    name = path.name.lower()
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(ext):
            return ext
    raise SystemExit(f"error: output {path} must end in .nii.gz, .nii, .nrrd or .mha")


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


def _add_common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="foundation model directory or registry id (default: the bundled demo weights)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_task_params(p: argparse.ArgumentParser, task: str) -> None:
    from .tasks import TASK_PARAMS

    group = p.add_argument_group(f"{task} parameters")
    for name, spec in TASK_PARAMS[task].items():
        flag = "--" + name.replace("_", "-")
        if spec.type is bool:
            group.add_argument(flag, dest=name, default=spec.default, action=argparse.BooleanOptionalAction,
                               help=f"{spec.help} (default: {spec.default})")
        elif spec.length is not None:
            group.add_argument(flag, dest=name, default=spec.default, nargs=spec.length, type=spec.type,
                               help=f"{spec.help} (default: {spec.default})")
        else:
            group.add_argument(flag, dest=name, type=spec.type, default=spec.default, choices=spec.choices,
                               help=f"{spec.help} (default: {spec.default})")


def _task_params(args, task: str) -> dict:
    from .tasks import TASK_PARAMS

    return {name: getattr(args, name) for name in TASK_PARAMS[task]}


def _write_outputs(result, main_name: str, output: Path, label_names=None) -> list[Path]:
    """Main volume to ``output``; the rest beside it. Written only after the task succeeded."""
    from . import io

    ext = _ext(output)
    base = output.name[: -len(ext)]
    written = []
    items = [(k, v, False) for k, v in result.volumes.items()] + [(k, v, True) for k, v in result.segmentations.items()]
    for name, vol, is_seg in items:
        path = output if (name == main_name and not is_seg) else output.with_name(f"{base}_{name}{ext}")
        if is_seg:
            from .volume import Volume
            vol = Volume(vol.array.astype("uint8"), vol.ijk_to_ras)
        io.write_volume(path, vol)
        written.append(path)
    return written




def _run_task_command(args, task: str) -> int:
    from . import io
    from .tasks import Cancelled, TaskRequest, run_task

    image = io.read_volume(args.input) if getattr(args, "input", None) else None
    anatomy = names = mask = None
    if getattr(args, "anatomy", None):
        anatomy, names = io.read_labelmap(args.anatomy)
    if getattr(args, "mask", None):
        mask, _ = io.read_labelmap(args.mask)
    if getattr(args, "reference", None):
        image = io.read_volume(args.reference)
    request = TaskRequest(image=image, region=args.region, anatomy=anatomy, anatomy_names=names, mask=mask,
                          params=_task_params(args, task))
    if args.output:
        output = Path(args.output)
    else:
        given = (getattr(args, "input", None) or getattr(args, "anatomy", None)
                 or getattr(args, "reference", None))
        src = Path(given or f"{task}.nii.gz")
        output = (src.parent if given else Path.cwd()) / f"{_stem(src)}_{task}.nii.gz"
    _ext(output)
    bar, update = (None, None) if args.quiet else _progress_bar(task)
    t0 = time.monotonic()
    try:
        result = run_task(task, request, args.model, controlnet=getattr(args, "controlnet", None),
                          device=args.device, progress=update)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written", file=sys.stderr)
        return 130
    except Cancelled:
        print("cancelled: nothing written", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    from .tasks.registry import task_spec

    written = _write_outputs(result, task_spec(task).primary_volume, output)
    for m in result.messages:
        print(f"note: {m}")
    print(f"{task}: {result.summary} [{time.monotonic() - t0:.1f} s]")
    for p in written:
        print(f"  wrote {p}")
    if result.scores:
        print("  scores: " + json.dumps({k: round(v, 4) for k, v in result.scores.items()}))
    return 0


def _add_task_command(sub, task: str, help: str, input_required: bool = True, mask: bool = False,
                      controlnet: bool = False):
    p = sub.add_parser(task, help=help, description=help, epilog=EPILOG_TASK)
    if input_required:
        p.add_argument("input", help="input CT: NIfTI, NRRD, MetaImage file or DICOM series folder")
    p.add_argument("-o", "--output", default=None, help="main output file (.nii.gz, .nii, .nrrd, .mha)")
    p.add_argument("--region", default="auto" if input_required else None,
                   help="head_neck | chest | abdomen | auto (guess from the image)")
    p.add_argument("--anatomy", default=None,
                   help="optional anatomy label map (TotalSegmentator classes; names from <file>.labels.json "
                        "or the TotalSegmentator v2 table)")
    if mask:
        p.add_argument("--mask", required=True, help="lesion / inpainting mask (non-zero = inside)")
    if controlnet:
        p.add_argument("--controlnet", default=None,
                       help="ControlNet directory or registry id (default: the bundled one for this task)")
    _add_common_run_args(p)
    _add_task_params(p, task)
    p.set_defaults(func=lambda a, t=task: _run_task_command(a, t))
    return p


# ----------------------------------------------------------------------- train
def _add_train_args(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--data", default=None,
                      help="folder of CT images (labels of the same name in <folder>/labels/) or a JSON manifest "
                           "[{\"image\": ..., \"labels\": ..., \"region\": ...}]")
    data.add_argument("--region", default=None, help="region for cases the manifest does not label "
                                                     "(default: guessed per image)")
    data.add_argument("--phantoms", type=int, default=0,
                      help="train on this many synthetic phantoms instead of (or besides) --data")
    data.add_argument("--phantom-seed", type=int, default=0, help="first phantom seed (default 0)")
    data.add_argument("--phantom-fov", type=float, nargs=3, default=(192.0, 256.0, 256.0),
                      metavar=("K_MM", "J_MM", "I_MM"), help="phantom field of view in mm (default 192 256 256)")
    data.add_argument("--phantom-max-voxels", type=int, default=4_000_000,
                      help="phantoms: at most this many voxels per case (the slab along k is shortened)")
    data.add_argument("--phantom-noise", type=float, default=0.0,
                      help="CT noise (HU) in training phantoms (default 0: learn clean anatomy)")
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, help="output folder: model/ (inference weights), training_state/, log")
    run.add_argument("--resume", action="store_true", help="continue exactly from <out>/training_state")
    run.add_argument("--steps", type=int, default=1000, help="total optimizer steps (default 1000)")
    run.add_argument("--batch-size", type=int, default=2, help="samples per process per micro-step (default 2)")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    run.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    run.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    run.add_argument("--ema-decay", type=float, default=0.999, help="EMA decay of the saved weights (default 0.999)")
    run.add_argument("--checkpoint-every", type=int, default=500, help="save every N steps (default 500)")
    run.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    run.add_argument("--seed", type=int, default=0, help="seed for weights init, sampling and noise (default 0)")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda (under torchrun: the local rank's GPU)")
    run.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                     help="auto = bf16 autocast on CUDA GPUs that support it, else fp32")
    run.add_argument("--p-drop-region", type=float, default=0.15, help="region-condition dropout (default 0.15)")
    run.add_argument("--p-drop-anatomy", type=float, default=0.15, help="anatomy-condition dropout (default 0.15)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


def _train_options(args):
    from .training import TrainOptions

    return TrainOptions(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                        ema_decay=args.ema_decay, grad_accum=args.grad_accum, checkpoint_every=args.checkpoint_every,
                        seed=args.seed, precision=args.precision, p_drop_region=args.p_drop_region,
                        p_drop_anatomy=args.p_drop_anatomy, max_minutes=args.max_minutes,
                        progress=not args.no_progress)


def _model_config(args):
    from .networks import preset

    overrides = {}
    if args.window:
        overrides["window"] = args.window
    if args.spacing_range:
        overrides["spacing_range_mm"] = tuple(args.spacing_range)
    if args.channels:
        overrides["channels"] = tuple(args.channels)
        overrides.setdefault("attention_levels", tuple([False] * (len(args.channels) - 1) + [True]))
    return preset(args.preset, **overrides)


def cmd_train(args) -> int:
    from .training import Trainer

    cfg = _model_config(args)
    if args.resume and (Path(args.out) / "model" / "config.json").exists():
        from .checkpoint import read_config
        from .networks import ModelConfig

        saved = read_config(Path(args.out) / "model")
        cfg = ModelConfig.from_dict({k: v for k, v in saved.items() if k not in ("kind", "format", "meta")})
    cases = _image_cases(args, cfg)
    if not cases:
        raise SystemExit("error: no training data: give --data and/or --phantoms N")
    trainer = Trainer(cases, args.out, _train_options(args), cfg, device=args.device)
    if args.init_from and not args.resume:
        from safetensors.torch import load_file

        from .training import warm_start

        fresh = warm_start(trainer.model, load_file(str(Path(args.init_from) / "model.safetensors")))
        trainer.ema = {k: v.detach().clone().float() for k, v in trainer.model.state_dict().items()}
        print(f"initialised from {args.init_from} ({len(fresh)} tensors kept fresh)")
    return _train(trainer, args, "train")


def _train(trainer, args, what: str) -> int:
    """Resume if asked, train, and print one summary line on the main process."""
    if args.resume:
        trainer.resume()
    losses = trainer.train()
    if trainer.dist.main:
        tail = losses[-min(len(losses), 20):] if losses else [float("nan")]
        print(f"{what}: {trainer.step} steps, mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f}; "
              f"model in {Path(args.out) / 'model'}")
    return 0


def _image_cases(args, cfg, thin_slices: bool = False) -> list:
    """Cases from --data and/or --phantoms (image-only training data)."""
    from .training import manifest_cases, phantom_cases

    cases = []
    if args.data:
        cases += manifest_cases(args.data, cfg, args.region)
    if args.phantoms:
        cases += phantom_cases(args.phantoms, cfg, seed=args.phantom_seed, fov_mm=args.phantom_fov,
                               noise_hu=args.phantom_noise, max_voxels=args.phantom_max_voxels,
                               thin_slices=thin_slices)
    return cases


def cmd_finetune(args) -> int:
    from .checkpoint import load_base, sha256_file
    from .conditions import CONTROL_CHANNELS
    from .finetune import lesion_phantom_cases, superres_cases
    from .networks import ControlNetConfig
    from .training import Trainer

    base_dir = _resolve_base(args.base)
    base = load_base(base_dir)
    cfg = base.cfg
    params = {}
    if args.task == "superres":
        factors = tuple(int(f) for f in args.factors)
        params["factors"] = list(factors)
        cases = superres_cases(_image_cases(args, cfg, thin_slices=True), factors)
    else:
        cases = []
        if args.data:
            cases += _lesion_manifest(args.data, cfg, args.region)
        if args.phantoms:
            cases += lesion_phantom_cases(args.phantoms, cfg, seed=args.phantom_seed, lesions=args.lesions,
                                          fov_mm=args.phantom_fov, max_voxels=args.phantom_max_voxels)
    if not cases:
        raise SystemExit("error: no training data: give --data and/or --phantoms N")
    cn_cfg = ControlNetConfig(task=args.task, control_channels=CONTROL_CHANNELS[args.task], base=cfg,
                              base_sha256=sha256_file(base_dir / "model.safetensors"), params=params)
    trainer = Trainer(cases, args.out, _train_options(args), cfg, device=args.device, base=base,
                      controlnet_cfg=cn_cfg)
    return _train(trainer, args, f"finetune ({args.task})")


def _resolve_base(name) -> Path:
    from .tasks.common import resolve_model_dir

    return resolve_model_dir(name, kind="base")


def _lesion_manifest(manifest, cfg, region):
    """Lesion pairs from a JSON manifest [{"image": ..., "mask": ..., "labels": ..., "region": ...}]."""
    from . import io
    from .finetune import lesion_cases_from_arrays

    path = Path(manifest)
    if not path.is_file():
        raise SystemExit("error: --data for lesion fine-tuning must be a JSON manifest with 'image' and 'mask'")
    cases = []
    for e in json.loads(path.read_text(encoding="utf-8")):
        if "image" not in e or "mask" not in e:
            raise SystemExit(f"error: manifest entry needs 'image' and 'mask': {e}")
        img = io.read_volume(path.parent / e["image"])
        mask, _ = io.read_labelmap(path.parent / e["mask"])
        labels = names = None
        if e.get("labels"):
            lv, names = io.read_labelmap(path.parent / e["labels"])
            labels = lv.array
        cases.append(lesion_cases_from_arrays(img.array, img.ijk_to_ras, mask.array > 0, e.get("region", region),
                                              cfg, labels, names, name=e["image"]))
    return cases


# ----------------------------------------------------------------------- phantom
def cmd_phantom(args) -> int:
    from . import io
    from .phantoms import make_phantom
    from .volume import Volume

    ph = make_phantom(args.region, shape_kji=tuple(args.shape), spacing_kji=tuple(args.spacing), seed=args.seed,
                      lesions=args.lesions, noise_hu=args.noise)
    out = Path(args.output)
    io.write_volume(out, ph.volume())
    ext = _ext(out)
    stem = out.name[: -len(ext)]
    lab = out.with_name(f"{stem}_labels{ext}")
    io.write_volume(lab, ph.label_volume(), label_names=ph.label_names)
    written = [out, lab]
    if ph.lesion_mask.any():
        les = out.with_name(f"{stem}_lesions{ext}")
        io.write_volume(les, Volume(ph.lesion_mask.astype("uint8"), ph.ijk_to_ras))
        written.append(les)
    print(f"phantom: {args.region}, seed {args.seed}, shape (k, j, i) {tuple(args.shape)}, "
          f"spacing {tuple(args.spacing)} mm, {int(ph.lesion_mask.any() and args.lesions)} lesion set(s)")
    for p in written:
        print(f"  wrote {p}")
    return 0


def cmd_export(args) -> int:
    """Copy a trained model into a shippable directory (optionally fp16) and register it."""
    from safetensors.torch import load_file

    from . import weights
    from .checkpoint import read_config, save_model, sha256_file
    from .networks import ControlNetConfig, ModelConfig

    src = Path(args.model)
    cfg = read_config(src)
    meta = cfg.get("meta", {})
    if cfg["kind"] == "base":
        config = ModelConfig.from_dict({k: v for k, v in cfg.items() if k not in ("kind", "format", "meta")})
    else:
        config = ControlNetConfig.from_dict(cfg)
    tensors = load_file(str(src / "model.safetensors"))
    import torch

    dest = Path(args.to)
    save_model(dest, config, tensors, dtype=torch.float16 if args.fp16 else None, extra=meta)
    digest = sha256_file(dest / "model.safetensors")
    size = (dest / "model.safetensors").stat().st_size
    print(f"export: {dest} ({size / 1e6:.1f} MB, sha256 {digest})")
    if args.register:
        reg = weights.registry_path()
        data = json.loads(reg.read_text(encoding="utf-8")) if reg.is_file() else {"format_version": 1, "default": None, "models": []}
        try:
            rel = dest.resolve().relative_to(weights.resources_dir().resolve())
        except ValueError:
            raise SystemExit(f"error: --register needs --to inside {weights.resources_dir()}") from None
        entry = {"id": args.id, "version": args.version, "kind": cfg["kind"], "path": rel.as_posix(),
                 "sha256": digest, "size": size, "min_gpu_memory_gb": args.min_gpu_memory_gb,
                 "description": args.description}
        if cfg["kind"] == "controlnet":
            if not args.base_id:
                raise SystemExit("error: registering a ControlNet needs --base-id")
            entry.update(task=config.task, base=args.base_id)
        data["models"] = [m for m in data.get("models", []) if m.get("id") != args.id] + [entry]
        if cfg["kind"] == "base" and args.default:
            data["default"] = args.id
        reg.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        print(f"  registered {args.id} in {reg}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output, model=args.model, device=args.device, seed=args.seed, progress=not args.quiet)
    return 0


def cmd_benchmark(args) -> int:
    from . import benchmark

    return benchmark.main(args)


# ----------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meddiff-fm", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and onnxruntime (default 0: "
                        "OMP_NUM_THREADS, else the CPUs this process may use, shared among torchrun's processes)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="pretrain the foundation model (single process or torchrun DDP)",
                       description="Pretrain the foundation model with multi-level samples, L1 on epsilon, cosine "
                                   "schedule (T = 1000), AdamW, EMA. Multi-GPU / multi-node: "
                                   "torchrun --nproc_per_node N -m MedDiffFMLib.cli train ...")
    model = p.add_argument_group("model")
    model.add_argument("--preset", default="small", choices=("base", "small", "tiny"),
                       help="network size: base (the paper's, 128^3 windows at 1 mm), small (CPU demo), tiny (tests)")
    model.add_argument("--window", type=int, default=None, help="override the preset's window edge (voxels)")
    model.add_argument("--spacing-range", type=float, nargs=2, default=None, metavar=("MIN_MM", "MAX_MM"),
                       help="override the voxel sizes the model is trained for (the condition is clamped to them)")
    model.add_argument("--init-from", default=None, metavar="MODEL_DIR",
                       help="start from an earlier model's weights where they fit (new input channels start at 0)")
    model.add_argument("--channels", type=int, nargs="+", default=None, help="override the channels per level")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    _add_task_command(sub, "denoise", "zero-shot denoising (DiffPIR with an estimated noise level)")
    _add_task_command(sub, "anomaly", "zero-shot anomaly detection by partial diffusion and reconstruction")
    sp = _add_task_command(sub, "synthesize", "synthesise a CT from a region and optional anatomy label map",
                           input_required=False)
    sp.add_argument("--reference", default=None, help="image whose grid the output takes (when no --anatomy)")

    p = sub.add_parser("finetune", help="fine-tune a task ControlNet (superres or lesion) on a frozen base",
                       description="Fine-tune a task ControlNet: a trainable copy of the base encoder with zero "
                                   "convolutions; the base stays frozen. Same machinery as train (EMA, resume, DDP).")
    p.add_argument("--base", default=None, help="base model directory or registry id (default: the bundled demo)")
    p.add_argument("--task", required=True, choices=("superres", "lesion"), help="which ControlNet")
    p.add_argument("--factors", type=int, nargs="+", default=(2, 3, 4, 5, 6), choices=(2, 3, 4, 5, 6),
                   metavar="F", help="superres: slab factors along k drawn per sample (default 2 3 4 5 6)")
    p.add_argument("--lesions", type=int, default=3, help="lesion: lesions per training phantom (default 3)")
    _add_train_args(p)
    p.set_defaults(func=cmd_finetune)

    _add_task_command(sub, "superres", "super-resolution with the super-resolution ControlNet", controlnet=True)
    _add_task_command(sub, "lesion", "generate a lesion inside a mask with the lesion ControlNet", mask=True,
                      controlnet=True)
    _add_task_command(sub, "inpaint", "RePaint inpainting inside a mask (lesion or healthy tissue)", mask=True,
                      controlnet=True)

    p = sub.add_parser("export", help="copy a trained model into a shippable directory and register it",
                       description="Write a model directory (optionally as fp16) and add it to Resources/models.json.")
    p.add_argument("model", help="trained model directory (e.g. runs/base/model)")
    p.add_argument("--to", required=True, help="destination model directory (e.g. Resources/models/<id>)")
    p.add_argument("--fp16", action="store_true", help="store floating weights as float16 (half the size)")
    p.add_argument("--register", action="store_true", help="add or replace the entry in Resources/models.json")
    p.add_argument("--id", default=None, help="registry id (with --register)")
    p.add_argument("--version", default="", help="registry version text")
    p.add_argument("--base-id", default=None, help="for a ControlNet: the registry id of its base")
    p.add_argument("--default", action="store_true", help="make this base model the default")
    p.add_argument("--min-gpu-memory-gb", type=float, default=None, help="registry hint for users")
    p.add_argument("--description", default="", help="registry description")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="denoising, anomaly detection and super-resolution on a held-out phantom",
                       description="Runs three tasks with the bundled demo weights on held-out phantoms and writes "
                                   "NIfTI outputs and PNG previews.")
    p.add_argument("--output", default="demo_output", help="output folder (default demo_output)")
    p.add_argument("--seed", type=int, default=100_001, help="phantom seed (held out from training)")
    _add_common_run_args(p)
    p.set_defaults(func=cmd_demo)

    from .benchmark.cli import DESCRIPTION as BENCHMARK_DESCRIPTION, add_arguments as add_benchmark_arguments

    p = sub.add_parser("benchmark", help="measure every task at clinical grids against classical baselines",
                       description=BENCHMARK_DESCRIPTION)
    add_benchmark_arguments(p)
    p.set_defaults(func=cmd_benchmark)

    p = sub.add_parser("phantom", help="write a synthetic CT phantom (image, labels, lesion mask)")
    p.add_argument("--region", default="abdomen", choices=("head_neck", "chest", "abdomen"),
                   help="body region (default abdomen)")
    p.add_argument("--shape", type=int, nargs=3, default=(48, 64, 64), metavar=("K", "J", "I"),
                   help="voxels along k, j, i (default 48 64 64)")
    p.add_argument("--spacing", type=float, nargs=3, default=(4.0, 4.0, 4.0), metavar=("SK", "SJ", "SI"),
                   help="voxel size in mm along k, j, i (default 4 4 4, the demo model's grid)")
    p.add_argument("--seed", type=int, default=100_000, help="phantom seed (training uses seeds below 10 000)")
    p.add_argument("--lesions", type=int, default=0, help="number of inserted lesions (default 0)")
    p.add_argument("--noise", type=float, default=12.0, help="CT noise std in HU (default 12)")
    p.add_argument("-o", "--output", required=True,
                   help="image file; labels and lesion mask are written beside it (<name>_labels, <name>_lesions)")
    p.set_defaults(func=cmd_phantom)

    from . import batch, onnx_backend  # their commands live with their code

    batch.add_cli(sub)
    onnx_backend.add_cli(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        from .threads import set_threads

        set_threads(args.threads)
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
