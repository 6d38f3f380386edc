"""Zero-shot denoising by DiffPIR plug-and-play restoration (Zhu et al. 2023).

For y = x + n with n ~ N(0, s^2) in model units, sqrt(a_t) * y is a sample of the forward
process at the t where sqrt((1 - a_t) / a_t) = s. Sampling starts there; at each step the
model's clean estimate x0 is pulled towards the data by the closed-form proximal step of
||y - x||^2 / (2 s^2) + rho_t / 2 ||x - x0||^2, i.e. x0' = (y + rho_t x0) / (1 + rho_t) with
rho_t = lambda * s^2 / sigma_t^2, and the chain continues from x0'.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .. import preprocessing
from ..sampling import Condition
from ..volume import Volume
from .base import COMMON_PARAMS, ParamSpec, TaskRequest, TaskResult
from .common import (anatomy_on_grid, back_to_input_grid, region_index, require_image, resolve_region,
                     sampler_for, to_model_grid)

PARAMS = {
    **COMMON_PARAMS,
    "steps": ParamSpec(int, 2, "reverse steps from the step that matches the noise level (few steps give the "
                               "most faithful, MMSE-like estimate; more give sharper texture)"),
    "noise_level": ParamSpec(float, 0.0, "noise standard deviation in HU (0 = estimate from the image)"),
    "strength": ParamSpec(float, 1.0, "multiplies the noise level: > 1 smooths more, < 1 less"),
    "lam": ParamSpec(float, 10.0, "DiffPIR lambda: weight of the prior against the data"),
}


def estimate_noise(unit: np.ndarray) -> float:
    """Noise standard deviation (model units) from flat regions of the image.

    The residual against the mean of the 6 face neighbours has variance 7/6 s^2 for white
    noise; its robust spread (MAD) is taken over voxels that are neither clipped by the window
    nor on edges (lowest 40% of the smoothed gradient).
    """
    x = unit.astype(np.float64)
    if min(x.shape) < 3:
        raise ValueError("the image is too thin (< 3 voxels on an axis) to estimate its noise; give noise_level")
    kernel = np.zeros((3, 3, 3))
    kernel[1, 1, 1] = 1.0
    for a in range(3):
        idx = [1, 1, 1]
        for o in (0, 2):
            idx[a] = o
            kernel[tuple(idx)] = -1 / 6
    resid = ndimage.convolve(x, kernel, mode="nearest")[1:-1, 1:-1, 1:-1]
    smooth = ndimage.gaussian_filter(x, 1.5)
    grad = ndimage.gaussian_gradient_magnitude(smooth, 1.0)[1:-1, 1:-1, 1:-1]
    inner = x[1:-1, 1:-1, 1:-1]
    ok = (np.abs(inner) < 0.98)
    if ok.sum() < 100:
        return 0.0
    flat = ok & (grad <= np.quantile(grad[ok], 0.4))
    r = resid[flat]
    mad = np.median(np.abs(r - np.median(r)))
    return float(1.4826 * mad / np.sqrt(7 / 6))


def run(request: TaskRequest, params: dict, predictor, device, progress=None, cancel=None) -> TaskResult:
    image = require_image(request)
    region = resolve_region(request, image)
    cfg = predictor.cfg
    grid = to_model_grid(image, cfg.spacing_mm, region)
    y = torch.from_numpy(grid.unit)
    lo, hi = preprocessing.window_bounds(region)
    to_unit = 2.0 / (hi - lo)
    if params["noise_level"] < 0 or params["strength"] <= 0:
        raise ValueError("noise_level must be >= 0 and strength > 0")
    sigma_est = estimate_noise(grid.unit) if params["noise_level"] == 0 else params["noise_level"] * to_unit
    sigma = sigma_est * params["strength"]
    groups, unknown = anatomy_on_grid(request, grid)
    cond = Condition(region=region_index(region), anatomy=groups)
    sampler = sampler_for(predictor, params, device)
    sched = sampler.schedule
    if sigma <= 0:
        out_unit = grid.unit
        t_start = -1
    else:
        t_start = max(1, sched.t_for_sigma(sigma))
        ts = sched.timesteps(params["steps"], t_start)
        x = (sched.alpha_bar(t_start) ** 0.5) * y
        lam = params["lam"]

        def data_step(t: int, x0: torch.Tensor) -> torch.Tensor:
            rho = lam * sigma ** 2 / max(sched.sigma(t) ** 2, 1e-12)
            return (y + rho * x0) / (1 + rho)

        out = sampler.run_chain(x, ts, cond, sampler.generator(), progress, cancel, "denoising", on_x0=data_step)
        out_unit = out.numpy()
    hu = preprocessing.unit_to_hu(out_unit, region).astype(np.float32)
    hu = back_to_input_grid(hu, grid, image, order=1)
    # The window clips what lies outside it: those voxels cannot have been denoised, keep them.
    keep = preprocessing.outside_window(image.array, region)
    denoised = np.where(keep, image.array, hu).astype(np.float32)
    noise_hu = sigma_est / to_unit
    return TaskResult(
        volumes={"denoised": Volume(denoised, image.ijk_to_ras.copy())},
        scores={"noise_level_hu": float(noise_hu), "start_timestep": float(t_start)},
        summary=f"denoised ({region} window): estimated noise {noise_hu:.1f} HU, started at t = {t_start}",
        messages=[f"unknown anatomy classes: {', '.join(unknown)}"] if unknown else [],
    )
