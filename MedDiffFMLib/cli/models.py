"""``export``: copy a trained model into a shippable directory (optionally fp16) and register it.

Several runs of one network that started from the same weights can be exported as one: their
weights are averaged (a uniform "model soup"), which costs nothing at sampling time and uses
runs trained side by side on separate cores."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UsageError
from .outputs import Planned, check_paths, write_all


def add_commands(sub) -> None:
    p = sub.add_parser("export", help="copy a trained model into a shippable directory and register it",
                       description="Write a model directory (optionally as fp16) and add it to Resources/models.json.")
    p.add_argument("model", nargs="+",
                   help="trained model directory (e.g. runs/base/model); several directories of the same network "
                        "and start are averaged weight by weight")
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

    sources, dest = [Path(m) for m in args.model], Path(args.to)
    configs = [read_config(src) for src in sources]
    cfg = configs[0]
    for src, other in zip(sources[1:], configs[1:]):
        if _without_meta(other) != _without_meta(cfg):
            raise UsageError(f"{str(src)!r} is not the same network as {str(sources[0])!r} (config.json differs); "
                             "only runs of one network can be averaged")
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"--to {str(dest)!r} is a file; give a folder")
    if any(dest.resolve() == src.resolve() for src in sources):
        raise UsageError(f"--to {str(dest)!r} is a model being exported; choose another folder")
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
    meta = cfg.get("meta", {}) if len(configs) == 1 else {"averaged": [c.get("meta", {}) for c in configs]}
    config = ModelConfig.from_dict(network_config(cfg)) if cfg["kind"] == "base" else ControlNetConfig.from_dict(cfg)
    tensors = _average([_load_tensors(src) for src in sources])  # layout and finiteness checked on load
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


def _without_meta(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k != "meta"}


def _average(state_dicts: list) -> dict:
    """The weight-by-weight mean of state dicts with the same keys and shapes (computed in float64,
    returned in each tensor's own dtype; integer buffers must agree, and are kept)."""
    import torch

    first = state_dicts[0]
    if len(state_dicts) == 1:
        return first
    for other in state_dicts[1:]:
        if other.keys() != first.keys() or any(other[k].shape != v.shape for k, v in first.items()):
            raise UsageError("the models to average hold different tensors; only runs of one network can be averaged")
    out = {}
    for key, value in first.items():
        if value.is_floating_point():
            out[key] = (sum(sd[key].double() for sd in state_dicts) / len(state_dicts)).to(value.dtype)
        elif all(torch.equal(sd[key], value) for sd in state_dicts):
            out[key] = value
        else:
            raise UsageError(f"the models to average differ in the integer tensor {key!r}")
    return out
