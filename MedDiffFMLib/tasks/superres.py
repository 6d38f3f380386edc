"""Super-resolution with the super-resolution ControlNet.

The output grid has the input's extent and direction and ``spacing / factor`` per axis, with
the first voxel corner fixed (geometry.regrid: Slicer's origin is a voxel centre, so the
origin moves by half the spacing change). The condition is the input interpolated onto the
model grid; sampling starts from that interpolation noised to ``noise_fraction`` of T. With
``consistency`` on (and integer factors on a model-aligned grid), a final back-projection
makes the block averages of the output equal the input wherever the input lies inside the
intensity window (exactly in model units, to float32 rounding in HU).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import preprocessing
from ..finetune import upsample_blocks
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
    consistent = bool(params["consistency"]) and aligned
    if consistent:
        x = project_block_means(x, lr_unit, fi)
    hu = preprocessing.unit_to_hu(x.numpy(), region).astype(np.float32)
    # The window clips HU outside it (bone, air in a soft-tissue window): there the model has
    # nothing to add, so those voxels take the plain interpolation in HU. With consistency the
    # block's own input value decides, so that blocks inside the window keep their block means.
    if aligned:
        interp_hu = upsample_blocks(torch.from_numpy(image.array.astype(np.float32)), fi, model_shape).numpy()
    else:
        interp_hu = lr_hu
    if consistent:
        outside = _per_block(preprocessing.outside_window(image.array, region), fi, model_shape)
    else:
        outside = preprocessing.outside_window(interp_hu, region)
    hu = np.where(outside, interp_hu, hu).astype(np.float32)
    out = preprocessing.resample_to_grid(hu, model_matrix, out_shape, out_matrix, order=1).astype(np.float32)
    sp = ", ".join(f"{s:.3g}" for s in out_spacing[::-1])
    return TaskResult(
        volumes={"superres": Volume(out, out_matrix)},
        scores={"start_timestep": float(t_start)},
        summary=f"super-resolved {image.shape[::-1]} -> {tuple(out_shape)[::-1]} voxels (i, j, k), spacing {sp} mm",
        messages=[f"unknown anatomy classes: {', '.join(unknown)}"] if unknown else [],
    )


def project_block_means(x: torch.Tensor, lr: torch.Tensor, factor) -> torch.Tensor:
    """``x`` shifted by one value per block and clipped to [-1, 1] so that its block means equal ``lr``.

    Spreading each block's residual evenly and clipping afterwards (the window) would break the
    equality wherever the sum leaves [-1, 1]. The mean of clip(x + c) grows monotonically with
    the shift c, so each block's c is found by bisection; ``lr`` (a windowed image, clipped to
    [-1, 1] here) always has a solution. Voxels past the last full block are left as they are.
    """
    f = tuple(int(a) for a in factor)
    n = tuple(s // a for s, a in zip(x.shape, f))
    crop = tuple(slice(0, a * b) for a, b in zip(n, f))
    xb = x[crop].float().reshape(n[0], f[0], n[1], f[1], n[2], f[2])
    target = lr[: n[0], : n[1], : n[2]].float().clamp(-1.0, 1.0)[:, None, :, None, :, None]
    lo = torch.full_like(target, -1.0 - float(xb.max()))  # every voxel clipped to -1
    hi = torch.full_like(target, 1.0 - float(xb.min()))  # every voxel clipped to +1
    for _ in range(40):  # the bracket shrinks below float32 resolution
        mid = 0.5 * (lo + hi)
        below = (xb + mid).clamp(-1.0, 1.0).mean(dim=(1, 3, 5), keepdim=True) < target
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    out = x.clone()
    out[crop] = (xb + 0.5 * (lo + hi)).clamp(-1.0, 1.0).reshape(out[crop].shape).to(x.dtype)
    return out


def _per_block(mask: np.ndarray, factor, shape) -> np.ndarray:
    """A per-block mask repeated onto the fine grid of ``shape`` (edge voxels extended)."""
    up = np.asarray(mask)
    for axis, f in enumerate(factor):
        up = np.repeat(up, int(f), axis=axis)
    pad = [(0, max(0, s - u)) for s, u in zip(shape, up.shape)]
    return np.pad(up, pad, mode="edge")[: shape[0], : shape[1], : shape[2]]


class _Scaled(torch.nn.Module):
    """A NoisePredictor with a fixed ControlNet conditioning scale."""

    def __init__(self, predictor, scale: float):
        super().__init__()
        self.inner = predictor
        self.scale = scale
        self.cfg = predictor.cfg

    def forward(self, *args):
        return self.inner(*args, control_scale=self.scale)
