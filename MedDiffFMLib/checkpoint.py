"""Model directories: ``config.json`` + ``model.safetensors``. No pickle anywhere.

A model directory holds the inference weights (the EMA weights when training kept an EMA).
Training state for exact resume lives beside it under ``training_state/`` (optimizer moments,
raw weights, RNG states) in safetensors and JSON as well.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import modelformat
from .modelformat import FORMAT
from .weights import sha256_file  # noqa: F401 (part of this module's API)
from .networks import ControlNetConfig, FoundationUNet, ModelConfig, NoisePredictor, TaskControlNet

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A model directory that cannot be used, with the reason in words."""


def _atomic_dir(target: Path):
    """Context: write into a temp dir beside ``target``, then swap it in."""

    class _Ctx:
        def __enter__(self):
            target.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            # mkdtemp makes a private (0700) folder: give the result the usual permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o777 & ~umask)
            for f in self.tmp.iterdir():
                os.chmod(f, 0o666 & ~umask)
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
            os.replace(self.tmp, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return False

    return _Ctx()


def save_model(directory: PathLike, config: Union[ModelConfig, ControlNetConfig], state_dict: dict,
               dtype: Optional[torch.dtype] = None, extra: Optional[dict] = None) -> Path:
    """Write a model directory atomically.

    Args:
        config: the foundation or ControlNet config (written to config.json).
        state_dict: the module's weights (tensors only).
        dtype: optionally cast floating weights (e.g. torch.float16 for shipping).
        extra: more JSON-serialisable facts for config.json's "meta" (training steps, ...).
    """
    directory = Path(directory)
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    cfg = config.to_dict()
    if isinstance(config, ModelConfig):
        cfg = {"kind": "base", **cfg}
    cfg["format"] = FORMAT
    if extra:
        cfg["meta"] = extra
    try:
        modelformat.check_config(json.loads(json.dumps(cfg)), directory / "config.json")
    except modelformat.ModelFormatError as e:
        raise CheckpointError(str(e)) from None
    with _atomic_dir(directory) as tmp:
        # one metadata entry: safetensors writes several in a random order per call, so the same
        # weights would get a different sha256 on every export (config.json holds the kind)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return directory


def read_config(directory: PathLike) -> dict:
    """The checked ``config.json`` of a model directory (every key and type, see
    :mod:`MedDiffFMLib.modelformat`).

    Raises:
        CheckpointError: a missing file or folder, invalid JSON, or a key that is missing,
            unknown or of the wrong type (the message names the file and the key).
    """
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise CheckpointError(f"model directory {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a model directory: config.json is missing")
    if not (directory / "model.safetensors").is_file():
        raise CheckpointError(f"{directory} has no model.safetensors")
    try:
        return modelformat.read_config_file(path)
    except modelformat.ModelFormatError as e:
        raise CheckpointError(str(e)) from None


def network_config(cfg: dict) -> dict:
    """The network's own keys of a base ``config.json`` (without kind, format, meta, ...)."""
    return {k: v for k, v in cfg.items() if k not in modelformat.FILE_KEYS}


def _load_tensors(directory: Path) -> dict:
    """The tensors of ``model.safetensors``; refuses a damaged layout and non-finite weights."""
    path = directory / "model.safetensors"
    try:
        modelformat.check_safetensors(path)
        tensors = load_file(str(path))
    except modelformat.ModelFormatError as e:
        raise CheckpointError(str(e)) from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or unreadable: {e}") from e
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path} holds NaN or infinite weights in {len(bad)} tensor(s), e.g. {bad[0]!r}; "
                              "the file is damaged: copy or download it again")
    return tensors


def _load_into(module: torch.nn.Module, tensors: dict, directory: Path) -> None:
    """Load with a clear report of every disagreement between config and weights."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = [f"{k}: file {tuple(tensors[k].shape)} vs config {tuple(own[k].shape)}"
                  for k in own if k in tensors and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} weights have other shapes than config.json implies, e.g. "
                         + "; ".join(mismatched[:3]))
        if missing:
            parts.append(f"{len(missing)} weights missing, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected weights, e.g. {unexpected[:3]}")
        raise CheckpointError(f"config.json and model.safetensors in {directory} disagree: " + ". ".join(parts)
                              + ". Were they saved from different models?")
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()})


def load_base(directory: PathLike, device: str | torch.device = "cpu") -> FoundationUNet:
    """Load a foundation model directory."""
    directory = Path(directory)
    cfg = read_config(directory)
    if cfg.get("kind") != "base":
        raise CheckpointError(f"{directory} holds a {cfg.get('kind')!r} model, not a foundation (base) model")
    try:
        config = ModelConfig.from_dict(network_config(cfg))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from e
    model = FoundationUNet(config)
    _load_into(model, _load_tensors(directory), directory)
    return model.to(device).eval()


def load_controlnet(directory: PathLike, base_directory: PathLike, device: str | torch.device = "cpu",
                    base: Optional[FoundationUNet] = None) -> NoisePredictor:
    """Load a ControlNet onto its base model; refuse a different base."""
    directory, base_directory = Path(directory), Path(base_directory)
    cfg = read_config(directory)
    if cfg.get("kind") != "controlnet":
        raise CheckpointError(f"{directory} is not a ControlNet model directory")
    try:
        config = ControlNetConfig.from_dict(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / 'config.json'}: {e}") from e
    base_hash = sha256_file(base_directory / "model.safetensors")
    if config.base_sha256 != base_hash:
        raise CheckpointError(
            f"the ControlNet in {directory} was trained on a base model with sha256 {config.base_sha256[:12]}…, "
            f"but {base_directory} has sha256 {base_hash[:12]}…; load it with the base it was trained on")
    base = base if base is not None else load_base(base_directory, device)
    if base.cfg.to_dict() != config.base.to_dict():
        raise CheckpointError(f"the ControlNet in {directory} was built for a different base configuration")
    cn = TaskControlNet(config)
    _load_into(cn, _load_tensors(directory), directory)
    return NoisePredictor(base, cn.to(device).eval())


# --------------------------------------------------------------------- training state
def save_training_state(directory: PathLike, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Tensors (optimizer moments, raw weights, RNG states) and a JSON state, atomically."""
    directory = Path(directory)
    with _atomic_dir(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")


def load_training_state(directory: PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    directory = Path(directory)
    try:
        tensors = load_file(str(directory / "state.safetensors"))
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot resume from {directory}: {e}") from e
    return tensors, state
