"""The foundation U-Net and its task ControlNets, built on MONAI's diffusion networks.

Network input per voxel (channels, in order):

* the noisy image x_t (1 channel, model units in [-1, 1]);
* the voxel's normalised coordinates (k, j, i) within the *whole* volume, in [-1, 1] (3);
* a NeRF-style sinusoidal encoding of those coordinates: sin and cos of 2^l * pi * c for
  l = 0 .. coord_frequencies - 1 (6 * coord_frequencies);
* the anatomy condition (:data:`MedDiffFMLib.anatomy.NUM_CHANNELS`, all zeros when absent);
* the voxel size of the window, per axis (k, j, i), as ``log2(mm) / 2`` (3 constant channels):
  the model is conditioned on voxel size (as MAISI's U-Net takes the spacing as an input), so
  one model serves the 0.5-5 mm grids real CT comes at, and every task runs on the input's
  own grid instead of resampling it onto a fixed model grid.

The region class enters through MONAI's class embedding (index 0 = null region). The output
is the predicted noise epsilon (1 channel).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet
from torch import nn

from . import anatomy

REGION_INDEX = {"head_neck": 1, "chest": 2, "abdomen": 3}  # 0 is the null (unconditional) region
NULL_REGION = 0


@dataclass
class ModelConfig:
    """Everything needed to rebuild the foundation network. Saved as ``config.json``.

    Attributes:
        name: preset name, informational.
        window: edge in voxels of the cubic window the network sees.
        spacing_range_mm: the voxel sizes (mm, any axis) the model was trained on; at inference
            the voxel-size condition is clamped to this range (the grid itself is never
            resampled to fit it).
        channels: feature channels per U-Net level (each level halves the resolution).
        attention_levels: self-attention per level (the paper: only at the 16^3 level).
        num_res_blocks: residual blocks per level (the paper: 1).
        num_head_channels: channels per attention head.
        norm_num_groups: group-norm groups; divides every entry of ``channels``.
        coord_frequencies: frequencies of the sinusoidal coordinate encoding.
        num_regions: region classes, not counting the null class.
        anatomy_channels: width of the anatomy condition (grouped one-hot, see anatomy.py).
        num_train_timesteps: T of the diffusion process.
        schedule: beta schedule name in MONAI's NoiseSchedules.
    """

    name: str = "tiny"
    window: int = 16
    spacing_range_mm: tuple[float, float] = (0.5, 8.0)
    channels: tuple[int, ...] = (8, 16)
    attention_levels: tuple[bool, ...] = (False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 8
    norm_num_groups: int = 8
    coord_frequencies: int = 2
    num_regions: int = 3
    anatomy_channels: int = anatomy.NUM_CHANNELS
    num_train_timesteps: int = 1000
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if len(self.channels) != len(self.attention_levels):
            raise ValueError("channels and attention_levels must have the same length")
        if self.window % self.downsampling != 0:
            raise ValueError(f"window {self.window} must be a multiple of {self.downsampling} "
                             f"(2 ** (levels - 1)) for a {len(self.channels)}-level U-Net")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError("every entry of channels must be a multiple of norm_num_groups")
        self.spacing_range_mm = tuple(float(s) for s in self.spacing_range_mm)
        if not (len(self.spacing_range_mm) == 2 and 0 < self.spacing_range_mm[0] <= self.spacing_range_mm[1]):
            raise ValueError(f"spacing_range_mm must be (min, max) with 0 < min <= max, got {self.spacing_range_mm}")

    @property
    def downsampling(self) -> int:
        """Total downsampling factor: window sizes must be multiples of it."""
        return 2 ** (len(self.channels) - 1)

    @property
    def in_channels(self) -> int:
        return 1 + 3 + 6 * self.coord_frequencies + self.anatomy_channels + SPACING_CHANNELS

    def clamp_spacing(self, spacing_mm) -> tuple[float, float, float]:
        """The voxel-size condition for a grid of ``spacing_mm`` (k, j, i): clamped to the trained range."""
        lo, hi = self.spacing_range_mm
        return tuple(float(min(max(float(s), lo), hi)) for s in spacing_mm)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        if "spacing_mm" in d and "spacing_range_mm" not in d:
            raise ValueError(
                f"this is a fixed-grid (v1, {d['spacing_mm']} mm) model: since v2 the model is conditioned on "
                "voxel size and runs at the input's own resolution; use the bundled 'meddifffm-demo-base' "
                "or retrain with 'meddiff-fm train'")
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; was this written by a newer MedDiffFM?")
        return cls(**d)


PRESETS: dict[str, ModelConfig] = {
    # The paper's network: 32 base channels, one residual block per level, attention only
    # at the 16^3 feature level of a 128^3 window.
    "base": ModelConfig(name="base", window=128, spacing_range_mm=(0.5, 8.0), channels=(32, 64, 128, 256),
                        attention_levels=(False, False, False, True), num_res_blocks=1,
                        num_head_channels=32, norm_num_groups=32, coord_frequencies=4),
    # CPU-friendly demo network: 32^3 windows, attention at the 8^3 level. Sized so that
    # training for about an hour on 2 CPU cores learns phantom anatomy and the demo runs three
    # tasks in under two minutes.
    "small": ModelConfig(name="small", window=32, spacing_range_mm=(0.5, 8.0), channels=(16, 32, 64),
                         attention_levels=(False, False, True), num_res_blocks=1,
                         num_head_channels=16, norm_num_groups=8, coord_frequencies=3),
    # Tests.
    "tiny": ModelConfig(),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def coordinate_encoding(coords: torch.Tensor, frequencies: int) -> torch.Tensor:
    """Sinusoidal encoding of normalised coordinates.

    Args:
        coords: (B, 3, D, H, W) coordinates in [-1, 1].
        frequencies: number of octaves L.

    Returns:
        (B, 6 L, D, H, W): sin then cos of 2^l * pi * c for each l and axis.
    """
    if frequencies == 0:
        return coords.new_zeros((coords.shape[0], 0, *coords.shape[2:]))
    scales = (2.0 ** torch.arange(frequencies, device=coords.device, dtype=coords.dtype)) * math.pi
    angles = coords.unsqueeze(2) * scales.view(1, 1, -1, 1, 1, 1)  # (B, 3, L, D, H, W)
    angles = angles.flatten(1, 2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


SPACING_CHANNELS = 3


def spacing_channels(spacing_mm: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, 3, D, H, W) voxel-size channels, ``log2(mm) / 2``, from ``spacing_mm`` (B, 3) (k, j, i).

    The logarithm makes a factor between voxel sizes one distance whatever the size;
    0.5-8 mm maps to [-0.5, 1.5].
    """
    feat = torch.log2(spacing_mm.to(device=like.device, dtype=torch.float32)) / 2
    return feat.to(like.dtype).view(*feat.shape, 1, 1, 1).expand(-1, -1, *like.shape[2:])


def _unet_kwargs(cfg: ModelConfig) -> dict:
    return dict(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        num_res_blocks=cfg.num_res_blocks,
        channels=cfg.channels,
        attention_levels=cfg.attention_levels,
        norm_num_groups=cfg.norm_num_groups,
        num_head_channels=cfg.num_head_channels,
        num_class_embeds=cfg.num_regions + 1,
        # Pytorch's scaled-dot-product attention: flash / memory-efficient kernels on GPUs.
        use_flash_attention=True,
    )


class FoundationUNet(nn.Module):
    """The foundation epsilon-prediction network (MONAI ``DiffusionModelUNet`` inside)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.unet = DiffusionModelUNet(out_channels=1, **_unet_kwargs(cfg))

    def network_input(self, x_t: torch.Tensor, coords: torch.Tensor, anatomy_channels: torch.Tensor,
                      spacing: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, D, H, W) from x_t (B, 1, ...), coords (B, 3, ...), anatomy (B, A, ...) and
        the voxel size ``spacing`` (B, 3) in mm."""
        enc = coordinate_encoding(coords, self.cfg.coord_frequencies)
        return torch.cat([x_t, coords.to(x_t.dtype), enc.to(x_t.dtype), anatomy_channels.to(x_t.dtype),
                          spacing_channels(spacing, x_t)], dim=1)

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        coords: torch.Tensor,
        anatomy_channels: torch.Tensor,
        region: torch.Tensor,
        spacing: torch.Tensor,
        down_residuals: Optional[Sequence[torch.Tensor]] = None,
        mid_residual: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Predict epsilon (B, 1, D, H, W). ``t``: (B,) integer timesteps; ``region``: (B,) long;
        ``spacing``: (B, 3) voxel size in mm (k, j, i)."""
        h = self.network_input(x_t, coords, anatomy_channels, spacing)
        return self.unet(
            h, timesteps=t, class_labels=region,
            down_block_additional_residuals=tuple(down_residuals) if down_residuals is not None else None,
            mid_block_additional_residual=mid_residual,
        )


@dataclass
class ControlNetConfig:
    """A task ControlNet on top of a foundation model. Saved as ``config.json``.

    Attributes:
        task: "superres" or "lesion".
        control_channels: channels of the task condition (superres: 1, lesion: 2).
        base: the foundation model's config.
        base_sha256: sha256 of the base model's ``model.safetensors`` it was trained on.
        params: task-specific settings (e.g. the super-resolution factor it was trained for).
    """

    task: str
    control_channels: int
    base: ModelConfig
    base_sha256: str = ""
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": "controlnet", "task": self.task, "control_channels": self.control_channels,
                "base_sha256": self.base_sha256, "params": self.params, "base": self.base.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "ControlNetConfig":
        return cls(task=d["task"], control_channels=int(d["control_channels"]),
                   base=ModelConfig.from_dict(d["base"]), base_sha256=d.get("base_sha256", ""),
                   params=dict(d.get("params", {})))


class TaskControlNet(nn.Module):
    """MONAI ``ControlNet``: a trainable copy of the foundation encoder with zero convolutions.

    The condition (C, D, H, W) is on the same grid as the image (pixel-space model), so the
    condition embedding has a single stage and does not downsample.
    """

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.cfg = cfg
        kw = _unet_kwargs(cfg.base)
        self.controlnet = ControlNet(
            conditioning_embedding_in_channels=cfg.control_channels,
            conditioning_embedding_num_channels=(cfg.base.channels[0],),
            **kw,
        )

    def init_from_base(self, base: FoundationUNet) -> None:
        """Copy the foundation encoder's weights; zero convolutions stay zero."""
        own = self.controlnet.state_dict()
        src = {k: v for k, v in base.unet.state_dict().items() if k in own and own[k].shape == v.shape}
        missing = [k for k in own if k not in src and not k.startswith("controlnet_")]
        if missing:
            raise RuntimeError(f"ControlNet and base disagree on {len(missing)} encoder weights, e.g. {missing[:3]}")
        self.controlnet.load_state_dict(src, strict=False)

    def forward(self, base: FoundationUNet, x_t, t, coords, anatomy_channels, region, spacing, control,
                scale: float = 1.0):
        h = base.network_input(x_t, coords, anatomy_channels, spacing)
        down, mid = self.controlnet(h, timesteps=t, controlnet_cond=control.to(h.dtype),
                                    conditioning_scale=scale, class_labels=region)
        return down, mid


class NoisePredictor(nn.Module):
    """Foundation model plus an optional ControlNet: the function the samplers call."""

    def __init__(self, base: FoundationUNet, controlnet: Optional[TaskControlNet] = None):
        super().__init__()
        self.base = base
        self.controlnet = controlnet

    @property
    def cfg(self) -> ModelConfig:
        return self.base.cfg

    def forward(self, x_t, t, coords, anatomy_channels, region, spacing, control=None, control_scale: float = 1.0):
        """Epsilon (B, 1, D, H, W); see :meth:`FoundationUNet.forward` for the inputs."""
        if self.controlnet is None:
            return self.base(x_t, t, coords, anatomy_channels, region, spacing)
        if control is None:
            raise ValueError("this model has a ControlNet: a control condition is required")
        down, mid = self.controlnet(self.base, x_t, t, coords, anatomy_channels, region, spacing, control,
                                    control_scale)
        return self.base(x_t, t, coords, anatomy_channels, region, spacing, down_residuals=down, mid_residual=mid)
