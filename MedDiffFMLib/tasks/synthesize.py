"""Synthesis: a new CT from a region and (optionally) an anatomy label map.

The output lies on the grid of the anatomy label map, else of the reference image, else on a
grid made from ``shape`` and ``spacing``. Multi-level sampling (image level, then native
refinement) keeps the global layout coherent on volumes larger than one window.
"""

from __future__ import annotations

import numpy as np

from .. import preprocessing
from ..geometry import make_ijk_to_ras
from ..sampling import Condition
from ..volume import Volume
from .base import COMMON_PARAMS, ParamSpec, TaskRequest, TaskResult, check_image
from .common import anatomy_on_grid, back_to_input_grid, grid_only, region_index, resolve_region, sampler_for

PARAMS = {
    **COMMON_PARAMS,
    "guidance_scale": ParamSpec(float, 1.0, "classifier-free guidance scale (1 = off)"),
    "multilevel": ParamSpec(bool, True, "image-level sample first, then native-resolution refinement"),
    "refine_fraction": ParamSpec(float, 0.6, "fraction of T at which native refinement starts"),
    "shape": ParamSpec(object, None, "(k, j, i) voxels when neither anatomy nor image gives the grid"),
    "spacing": ParamSpec(object, None, "(k, j, i) mm when neither anatomy nor image gives the grid"),
}


def run(request: TaskRequest, params: dict, predictor, device, progress=None, cancel=None) -> TaskResult:
    cfg = predictor.cfg
    if request.anatomy is not None:
        reference = request.anatomy
    elif request.image is not None:
        reference = check_image(request.image)
    else:
        shape = tuple(int(s) for s in (params["shape"] or (cfg.window,) * 3))
        spacing = tuple(float(s) for s in (params["spacing"] or (cfg.spacing_mm,) * 3))
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"shape must be 3 positive integers (k, j, i), got {shape}")
        reference = Volume(np.zeros(shape, np.float32), make_ijk_to_ras(spacing))
    region = resolve_region(request, request.image)
    grid = grid_only(reference, cfg.spacing_mm)
    groups, unknown = anatomy_on_grid(request, grid)
    cond = Condition(region=region_index(region), anatomy=groups)
    sampler = sampler_for(predictor, params, device, guidance_scale=params["guidance_scale"])
    if params["multilevel"]:
        x = sampler.sample_multilevel(grid.shape, cond, refine_fraction=params["refine_fraction"],
                                      progress=progress, cancel=cancel)
    else:
        x = sampler.sample(grid.shape, cond, progress=progress, cancel=cancel)
    hu = preprocessing.unit_to_hu(x.numpy(), region).astype(np.float32)
    out = back_to_input_grid(hu, grid, reference, order=1).astype(np.float32)
    messages = []
    if unknown:
        messages.append("anatomy classes not known to the model (treated as body tissue): " + ", ".join(unknown))
    return TaskResult(
        volumes={"synthetic": Volume(out, reference.ijk_to_ras.copy())},
        scores={"unknown_classes": float(len(unknown))},
        summary=f"synthesised a {region} CT of {out.shape[::-1]} voxels (i, j, k)"
        + (f"; {len(unknown)} unknown anatomy classes" if unknown else ""),
        messages=messages,
    )
