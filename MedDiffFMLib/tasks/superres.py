"""Super-resolution with the super-resolution ControlNet.

The output grid has the input's extent and direction and ``spacing / factor`` per axis, with
the first voxel corner fixed (geometry.regrid: Slicer's origin is a voxel centre, so the
origin moves by half the spacing change). The condition is the input interpolated onto the
model grid; sampling starts from that interpolation noised to ``noise_fraction`` of T. With
``consistency`` on (and integer factors on a model-aligned grid), a final back-projection
makes the block averages of the output equal the input exactly (in model units).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import preprocessing
from ..finetune import thick_slices, upsample_blocks
from ..geometry import regrid
from ..sampling import Condition
from ..volume import Volume
from .base import COMMON_PARAMS, ParamSpec, TaskRequest, TaskResult
from .common import ModelGrid, anatomy_on_grid, region_index, require_image, resolve_region, sampler_for

PARAMS = {
    **COMMON_PARAMS,
    "factor": ParamSpec(object, None, "upsampling factor per axis (k, j, i); default: the ControlNet's "
                                      "training factor, e.g. 4 1 1 for 4x thinner slices"),
    "noise_fraction": ParamSpec(float, 0.6, "start from the interpolated image noised to this fraction of T "
                                            "(1 = from pure noise)"),
    "consistency": ParamSpec(bool, True, "back-project so block averages of the output equal the input"),
    "control_scale": ParamSpec(float, 1.0, "ControlNet conditioning scale"),
}


def run(request: TaskRequest, params: dict, predictor, device, progress=None, cancel=None) -> TaskResult:
    image = require_image(request)
    region = resolve_region(request, image)
    cfg = predictor.cfg
    trained = predictor.controlnet.cfg.params.get("factor") if predictor.controlnet is not None else None
    factor = params["factor"] if params["factor"] is not None else trained
    if factor is None:
        raise ValueError("give the super-resolution factor per axis (k, j, i)")
    factor = tuple(float(f) for f in factor)
    if len(factor) != 3 or min(factor) < 1:
        raise ValueError(f"factor must be three numbers >= 1 (k, j, i), got {factor}")
    if not 0.0 < params["noise_fraction"] <= 1.0:
        raise ValueError("noise_fraction must be in (0, 1]")
    out_spacing = image.spacing_kji / np.asarray(factor)
    out_matrix, out_shape = regrid(image.ijk_to_ras, image.shape, out_spacing)
    # the model's grid over the same box
    model_matrix, model_shape = regrid(image.ijk_to_ras, image.shape, (cfg.spacing_mm,) * 3)
    grid = ModelGrid(model_matrix, tuple(model_shape))
    aligned = np.allclose(out_spacing, cfg.spacing_mm, rtol=1e-6) and all(float(f).is_integer() for f in factor)
    lr_unit = torch.from_numpy(preprocessing.hu_to_unit(image.array, region))
    fi = tuple(int(f) for f in factor) if aligned else None
    if aligned:
        control = upsample_blocks(lr_unit, fi, model_shape)
    else:
        lr_hu = preprocessing.resample_to_grid(image.array, image.ijk_to_ras, model_shape, model_matrix, order=1)
        control = torch.from_numpy(preprocessing.hu_to_unit(lr_hu, region))
    groups, unknown = anatomy_on_grid(request, grid)
    cond = Condition(region=region_index(region), anatomy=groups, control=control[None])
    sampler = sampler_for(predictor, params, device)
    predictor_scale = params["control_scale"]
    if predictor_scale != 1.0:
        sampler.predictor = _Scaled(predictor, predictor_scale)
    T = cfg.num_train_timesteps
    t_start = int(round(params["noise_fraction"] * (T - 1)))
    x = sampler.sample(model_shape, cond, x_init=control, t_start=t_start, progress=progress, cancel=cancel,
                       stage="super-resolution")
    if params["consistency"] and aligned:
        n = [s // f for s, f in zip(model_shape, fi)]
        lr = lr_unit[: n[0], : n[1], : n[2]]
        residual = lr - thick_slices(x, fi)
        # spread each block's residual evenly over its voxels: block means then equal the input
        up = residual.repeat_interleave(fi[0], 0).repeat_interleave(fi[1], 1).repeat_interleave(fi[2], 2)
        x = x.clone()
        x[: up.shape[0], : up.shape[1], : up.shape[2]] += up
    hu = preprocessing.unit_to_hu(x.numpy(), region).astype(np.float32)
    # The window clips HU outside it (bone, air in a soft-tissue window): there the model has
    # nothing to add, so those voxels take the plain interpolation in HU.
    if aligned:
        interp_hu = upsample_blocks(torch.from_numpy(image.array.astype(np.float32)), fi, model_shape).numpy()
    else:
        interp_hu = lr_hu
    hu = np.where(preprocessing.outside_window(interp_hu, region), interp_hu, hu).astype(np.float32)
    out = preprocessing.resample_to_grid(hu, model_matrix, out_shape, out_matrix, order=1).astype(np.float32)
    sp = ", ".join(f"{s:.3g}" for s in out_spacing[::-1])
    return TaskResult(
        volumes={"superres": Volume(out, out_matrix)},
        scores={"start_timestep": float(t_start)},
        summary=f"super-resolved {image.shape[::-1]} -> {tuple(out_shape)[::-1]} voxels (i, j, k), spacing {sp} mm",
        messages=[f"unknown anatomy classes: {', '.join(unknown)}"] if unknown else [],
    )


class _Scaled(torch.nn.Module):
    """A NoisePredictor with a fixed ControlNet conditioning scale."""

    def __init__(self, predictor, scale: float):
        super().__init__()
        self.inner = predictor
        self.scale = scale
        self.cfg = predictor.cfg

    def forward(self, *args):
        return self.inner(*args, control_scale=self.scale)
