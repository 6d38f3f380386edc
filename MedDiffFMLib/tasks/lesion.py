"""Lesion generation with the lesion ControlNet.

The user's mask (drawn in healthy tissue) and the image with the mask blanked condition the
ControlNet; sampling runs on a box around the mask (its coordinates still those of the whole
volume), starting from the image noised to ``noise_fraction`` of T. The generated voxels
replace the image inside the mask only; every voxel outside the mask keeps its input value
bit for bit. The lesion segmentation is the mask on the image grid.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import preprocessing
from ..finetune import lesion_condition
from ..sampling import Condition
from ..volume import Volume
from .base import COMMON_PARAMS, ParamSpec, TaskRequest, TaskResult
from .common import (anatomy_on_grid, box_around, coord_range, mask_on_grid, region_index, require_image,
                     resolve_region, sampler_for, to_model_grid)

PARAMS = {
    **COMMON_PARAMS,
    "noise_fraction": ParamSpec(float, 1.0, "start from the image noised to this fraction of T (1 = pure noise "
                                            "inside the box)"),
    "margin_mm": ParamSpec(float, 16.0, "context around the mask that the sampler sees (mm)"),
    "control_scale": ParamSpec(float, 1.0, "ControlNet conditioning scale"),
}


def prepare_local(request: TaskRequest, params: dict, predictor):
    """Image, region, model grid, mask on both grids, box and conditions shared by lesion and inpaint."""
    if request.mask is None:
        raise ValueError("this task needs a mask: draw the lesion region first")
    image = require_image(request)
    region = resolve_region(request, image)
    cfg = predictor.cfg
    mask_in = mask_on_grid(request.mask, image.shape, image.ijk_to_ras, "mask")
    grid = to_model_grid(image, cfg.spacing_mm, region)
    mask_model = preprocessing.resample_to_grid(mask_in, image.ijk_to_ras, grid.shape, grid.ijk_to_ras, order=0)
    mask_model = np.asarray(mask_model, dtype=bool)
    if not mask_model.any():
        # a mask thinner than a model voxel: keep the voxel nearest to its centre
        c = np.round(np.mean(np.nonzero(mask_in), axis=1)).astype(int)
        ijk = np.r_[c[::-1], 1.0]
        ras = image.ijk_to_ras @ ijk
        kji = np.round((np.linalg.inv(grid.ijk_to_ras) @ ras)[:3][::-1]).astype(int)
        kji = np.clip(kji, 0, np.array(grid.shape) - 1)
        mask_model[tuple(kji)] = True
    margin = int(np.ceil(params["margin_mm"] / cfg.spacing_mm))
    box = box_around(mask_model, margin, cfg.window)
    groups, unknown = anatomy_on_grid(request, grid)
    return image, region, grid, mask_in, mask_model, box, groups, unknown


def paste(image: Volume, mask_in: np.ndarray, mask_model: np.ndarray, box, generated: np.ndarray, grid,
          region: str) -> np.ndarray:
    """The input with the generated box content (model units) inside the mask, on the input
    grid, in HU; outside the mask, the input's values bit for bit."""
    full = grid.unit.copy()
    full[box] = np.where(mask_model[box], generated, full[box])
    hu = preprocessing.unit_to_hu(full, region).astype(np.float32)
    gen = preprocessing.resample_to_grid(hu, grid.ijk_to_ras, image.shape, image.ijk_to_ras, order=1)
    out = np.array(image.array, dtype=np.float32, copy=True)
    out[mask_in] = gen[mask_in]
    return out


def run(request: TaskRequest, params: dict, predictor, device, progress=None, cancel=None) -> TaskResult:
    image, region, grid, mask_in, mask_model, box, groups, unknown = prepare_local(request, params, predictor)
    y = torch.from_numpy(grid.unit)
    m = torch.from_numpy(mask_model)
    control = lesion_condition(y, m)
    cond = Condition(region=region_index(region), anatomy=groups[box] if groups is not None else None,
                     control=control[(slice(None), *box)], coord_range=coord_range(box, grid.shape))
    sampler = sampler_for(predictor, params, device)
    if params["control_scale"] != 1.0:
        from .superres import _Scaled
        sampler.predictor = _Scaled(predictor, params["control_scale"])
    T = predictor.cfg.num_train_timesteps
    t_start = int(round(params["noise_fraction"] * (T - 1)))
    crop = y[box]
    x = sampler.sample(tuple(crop.shape), cond, x_init=crop, t_start=t_start, progress=progress, cancel=cancel,
                       stage="lesion generation")
    out = paste(image, mask_in, mask_model, box, x.numpy(), grid, region)
    contrast = float(out[mask_in].mean() - image.array[mask_in].mean())
    return TaskResult(
        volumes={"lesion": Volume(out, image.ijk_to_ras.copy())},
        segmentations={"lesion": Volume(mask_in.copy(), image.ijk_to_ras.copy())},
        scores={"mean_change_hu": contrast, "lesion_volume_ml": float(mask_in.sum() * np.prod(image.spacing_kji) / 1e3)},
        summary=f"generated a lesion in {int(mask_in.sum())} voxels (mean change {contrast:+.1f} HU)",
        messages=[f"unknown anatomy classes: {', '.join(unknown)}"] if unknown else [],
    )
