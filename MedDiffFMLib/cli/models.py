"""``export``: copy a trained model into a shippable directory (optionally fp16) and register it."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError
from .outputs import Planned, check_paths, write_all


def add_commands(sub) -> None:
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


def cmd_export(args) -> int:
    from .. import weights
    from ..checkpoint import _load_tensors, network_config, read_config, save_model, sha256_file
    from ..networks import ControlNetConfig, ModelConfig

    src, dest = Path(args.model), Path(args.to)
    cfg = read_config(src)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"--to {str(dest)!r} is a file; give a folder")
    if dest.resolve() == src.resolve():
        raise UsageError(f"--to {str(dest)!r} is the model being exported; choose another folder")
    if args.register:
        if not args.id or not weights._ID.match(args.id):
            raise UsageError(f"--register needs --id of letters, digits, '.', '_' or '-', got {args.id!r}")
        if cfg["kind"] == "controlnet" and not args.base_id:
            raise UsageError("registering a ControlNet needs --base-id")
        try:
            rel = dest.resolve().relative_to(weights.resources_dir().resolve())
        except ValueError:
            raise UsageError(f"--register needs --to inside {weights.resources_dir()}") from None
        check_paths([Planned(weights.registry_path(), "the registry")], {})
    meta = cfg.get("meta", {})
    config = ModelConfig.from_dict(network_config(cfg)) if cfg["kind"] == "base" else ControlNetConfig.from_dict(cfg)
    tensors = _load_tensors(src)  # layout and finiteness checked
    import torch

    save_model(dest, config, tensors, dtype=torch.float16 if args.fp16 else None, extra=meta)
    digest = sha256_file(dest / "model.safetensors")
    size = (dest / "model.safetensors").stat().st_size
    print(f"export: {dest} ({size / 1e6:.1f} MB, sha256 {digest})")
    if args.register:
        reg = weights.registry_path()
        data = json.loads(reg.read_text(encoding="utf-8")) if reg.is_file() else {"format_version": 1, "default": None,
                                                                                  "models": []}
        entry = {"id": args.id, "version": args.version, "kind": cfg["kind"], "path": rel.as_posix(),
                 "sha256": digest, "size": size, "min_gpu_memory_gb": args.min_gpu_memory_gb,
                 "description": args.description}
        if cfg["kind"] == "controlnet":
            entry.update(task=config.task, base=args.base_id)
        data["models"] = [m for m in data.get("models", []) if m.get("id") != args.id] + [entry]
        if cfg["kind"] == "base" and args.default:
            data["default"] = args.id
        write_all([(reg, json.dumps(data, indent=2) + "\n", None)])
        print(f"  registered {args.id} in {reg}")
    return 0
