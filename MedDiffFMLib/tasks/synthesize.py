"""Synthesis: a new CT from a region and (optionally) an anatomy label map.

The output lies on the grid of the anatomy label map, else of the reference image, else on a
grid made from ``shape`` and ``spacing``, and is sampled on that grid itself. With
``multilevel`` the whole volume is first sampled at window size (the global layout, at a
coarse voxel size the model is told) and then refined on the output grid.

With a label map the chain starts, by default, from the map's layout (each tissue group at its
typical HU in the contrast phase asked for) noised to ``layout_start`` of T, not from pure
noise: from pure noise the demo model lost each image's overall intensity (chests came out
about 400 HU too dark). Chosen on training-family phantoms; see the model card.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import anatomy, preprocessing
from ..geometry import make_ijk_to_ras
from ..volume import Volume
from .base import TaskRequest, TaskResult, check_image
from .common import Models, check_grid, check_label_volume, region_index, resolve_region, unknown_message


@dataclass
class Plan:
    region: str
    ijk_to_ras: np.ndarray
    shape: tuple
    groups: Optional[np.ndarray]
    params: dict
    unknown: list


def prepare(request: TaskRequest, params: dict, models: Models) -> Plan:
    if request.anatomy is not None:
        ref = check_label_volume(request.anatomy, "anatomy label map")
        matrix, shape = ref.ijk_to_ras, tuple(ref.array.shape)
    elif request.image is not None:
        ref = check_image(request.image)
        matrix, shape = ref.ijk_to_ras, tuple(ref.shape)
    else:
        shape = params["shape"] or (models.cfg.window,) * 3
        matrix = make_ijk_to_ras(params["spacing"] or (1.5, 1.5, 1.5))
    check_grid(matrix, shape, "output grid")
    region = resolve_region(request, request.image)
    groups, unknown = None, []
    if request.anatomy is not None:
        groups, unknown = anatomy.group_map(np.asarray(request.anatomy.array), request.anatomy_names)
    return Plan(region, np.asarray(matrix, dtype=np.float64).copy(), tuple(int(s) for s in shape), groups, params,
                unknown)


def run(plan: Plan, sampler, progress=None, cancel=None) -> TaskResult:
    import torch

    from ..diffusion import timestep_at
    from ..geometry import spacing_kji
    from ..sampling import Condition, coarse_to_fine, partial_diffusion, sample_chain

    p = plan.params
    cond = Condition(spacing=tuple(spacing_kji(plan.ijk_to_ras)), region=region_index(plan.region),
                     anatomy=torch.from_numpy(plan.groups) if plan.groups is not None else None)
    gen = sampler.generator()
    sched = sampler.schedule
    layout, t_start, refine_fraction = None, None, p["refine_fraction"]
    if plan.groups is not None and p["layout_start"] < 1.0:
        layout_hu = anatomy.typical_hu(plan.groups, p["contrast_phase"])
        layout = torch.from_numpy(preprocessing.hu_to_unit(layout_hu, plan.region)).to(sampler.device)
        t_start = timestep_at(p["layout_start"], sched.num_train_timesteps)
        refine_fraction = min(refine_fraction, p["layout_start"])  # never noisier than the start
    if p["multilevel"]:
        x, _ = coarse_to_fine(sampler, cond, plan.shape, refine_fraction=refine_fraction, x0=layout,
                              coarse_t_start=t_start, gen=gen, progress=progress, cancel=cancel, stage="synthesis")
    elif layout is not None:
        x = partial_diffusion(sampler.denoiser(cond, plan.shape), sched, layout, t_start, p["steps"], gen=gen,
                              eta=sampler.options.step_eta, clip_x0=sampler.options.clip_x0, progress=progress,
                              cancel=cancel, stage="synthesis")
    else:
        x = sample_chain(sampler.denoiser(cond, plan.shape), sched, sampler.noise(plan.shape, gen),
                         sched.timesteps(p["steps"]), eta=sampler.options.step_eta, gen=gen,
                         clip_x0=sampler.options.clip_x0, progress=progress, cancel=cancel, stage="synthesis")
    hu = preprocessing.unit_to_hu(x.cpu().numpy(), plan.region).astype(np.float32)
    return TaskResult(
        volumes={"synthetic": Volume(hu, plan.ijk_to_ras.copy())},
        scores={"unknown_classes": float(len(plan.unknown))},
        summary=f"synthesised a {plan.region} CT of {hu.shape[::-1]} voxels (i, j, k)"
        + (f"; {len(plan.unknown)} unknown anatomy classes" if plan.unknown else ""),
        messages=unknown_message(plan.unknown),
    )
