"""Lesion generation with the lesion ControlNet, on the input's own grid.

The user's mask (drawn in healthy tissue) and the image with the mask blanked condition the
ControlNet; sampling runs on a box around the mask (its coordinates still those of the whole
volume, its voxel size the input's), starting from the image noised to ``noise_fraction``
of T. The generated voxels replace the image inside the mask only; every voxel outside the
mask keeps its input value bit for bit. The lesion segmentation is the mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import preprocessing
from ..conditions import CONTROL_CHANNELS
from ..volume import Volume
from .base import TaskRequest, TaskResult
from .common import (Models, anatomy_groups, box_around, coord_range, mask_on_image, region_index, require_image,
                     resolve_region, unknown_message, voxel_volume_ml)
from .denoise import estimate_noise


NOISE_MATCH_SEED_OFFSET = 7  # its own noise stream, apart from the sampler's


@dataclass
class LocalPlan:
    """What lesion generation and inpainting share: the image, the mask and the box around it."""

    image: Volume
    region: str
    mask: np.ndarray  # on the image grid
    box: tuple
    unit_box: np.ndarray  # the image in model units, inside the box
    groups_box: Optional[np.ndarray]
    params: dict
    messages: list

    def condition(self, control):
        import torch

        from ..sampling import Condition

        return Condition(spacing=tuple(self.image.spacing_kji), region=region_index(self.region),
                         anatomy=torch.from_numpy(self.groups_box) if self.groups_box is not None else None,
                         control=control, coord_range=coord_range(self.box, self.image.shape))

    def box_tensors(self, device):
        """(image in model units, mask) inside the box, as tensors on ``device``."""
        import torch

        return torch.from_numpy(self.unit_box).to(device), torch.from_numpy(self.mask[self.box]).to(device)

    def image_noise_unit(self) -> float:
        """The image's own noise standard deviation around the mask (model units; 0 for a box
        under 3 voxels thick, too thin to measure it)."""
        return estimate_noise(self.unit_box) if min(self.unit_box.shape) >= 3 else 0.0

    def paste(self, generated_unit: np.ndarray, sampler) -> np.ndarray:
        """The input with the generated box content inside the mask, in HU; outside the mask
        the input's values bit for bit.

        The model draws noise-free tissue, so a scan's own noise is added to the new content
        when ``params["match_noise"]`` (white, of the level :meth:`image_noise_unit` measures,
        from the sampler's seed on a stream of its own): a smooth patch in a noisy scan is a tell-tale
        of editing (measured on held-out inpainting with 12 HU of noise: std inside / std
        around 0.42 without it)."""
        import torch

        out = np.array(self.image.array, dtype=np.float32, copy=True)
        inside = self.mask[self.box]
        if self.params["match_noise"]:
            noise = torch.randn(generated_unit.shape, generator=sampler.generator(NOISE_MATCH_SEED_OFFSET)).numpy()
            generated_unit = generated_unit + self.image_noise_unit() * noise
        gen_hu = preprocessing.unit_to_hu(generated_unit, self.region).astype(np.float32)
        out[self.box] = np.where(inside, gen_hu, out[self.box])
        return out


def prepare_local(request: TaskRequest, params: dict, models: Models) -> LocalPlan:
    cn = models.controlnet_cfg
    if cn.control_channels != CONTROL_CHANNELS["lesion"]:
        raise ValueError(f"the ControlNet in {models.controlnet_dir} takes {cn.control_channels} condition channels; "
                         f"the lesion tasks need {CONTROL_CHANNELS['lesion']}")
    image = require_image(request)
    region = resolve_region(request, image)
    mask = mask_on_image(request, image)
    if mask.all():
        raise ValueError("the mask covers the whole image: draw it around the region to change")
    margin_vox = np.ceil(params["margin_mm"] / np.asarray(image.spacing_kji)).astype(int)
    box = box_around(mask, margin_vox, models.cfg.window)
    groups, unknown = anatomy_groups(request, image.shape, image.ijk_to_ras)
    unit_box = preprocessing.hu_to_unit(np.asarray(image.array)[box], region).astype(np.float32)
    return LocalPlan(image, region, mask, box, unit_box, groups[box] if groups is not None else None, params,
                     unknown_message(unknown))


prepare = prepare_local


def run(plan: LocalPlan, sampler, progress=None, cancel=None) -> TaskResult:
    from ..conditions import lesion_condition
    from ..diffusion import timestep_at
    from ..sampling import partial_diffusion

    p, image, mask = plan.params, plan.image, plan.mask
    y, m = plan.box_tensors(sampler.device)
    t_start = timestep_at(p["noise_fraction"], sampler.schedule.num_train_timesteps)
    den = sampler.denoiser(plan.condition(lesion_condition(y, m)), y.shape)
    x = partial_diffusion(den, sampler.schedule, y, t_start, p["steps"], gen=sampler.generator(),
                          eta=sampler.options.step_eta, clip_x0=sampler.options.clip_x0, progress=progress,
                          cancel=cancel, stage="lesion generation")
    out = plan.paste(x.cpu().numpy(), sampler)
    contrast = float(out[mask].mean() - np.asarray(image.array)[mask].mean())
    return TaskResult(
        volumes={"lesion": Volume(out, image.ijk_to_ras.copy())},
        segmentations={"lesion": Volume(mask.copy(), image.ijk_to_ras.copy())},
        scores={"mean_change_hu": contrast, "lesion_volume_ml": float(mask.sum() * voxel_volume_ml(image))},
        summary=f"generated a lesion in {int(mask.sum())} voxels (mean change {contrast:+.1f} HU)",
        messages=plan.messages,
    )
