"""Sections that restore an image: denoising and super-resolution, each beside its baselines."""

from __future__ import annotations

import time

import numpy as np

from .. import metrics, preprocessing
from ..geometry import regrid
from ..volume import Volume
from . import baselines
from .cases import case_region, make_case, superres_grid, tuning_seed, clinical_grid
from .options import NLM_H_FACTOR, NLM_PATCH_DISTANCE, NLM_PATCH_SIZE, PARABOLIC, SLAB_TV, SUPERRES_THIN_MM
from .task_facts import primary_volume, superres_factor_param

CAPTIONS = {
    "denoise": (
        "Noise-free phantom + the family's CT noise (held-out: filtered-back-projection-like texture, slices "
        "independent; training: its Gaussian-correlated noise). PSNR / SSIM in HU with both images clipped to the "
        "region window (data range = width), inside the body. Edge sharpness: mean gradient magnitude of the output "
        "on the truth's edges (top 10% of its gradient) over the truth's (1 = as sharp; noise raises it, blur lowers "
        "it). Gaussian: sigma (mm) tuned per region and level on a separate case. Non-local means (scikit-image, "
        f"patch {NLM_PATCH_SIZE}, distance {NLM_PATCH_DISTANCE}, h = {NLM_H_FACTOR} sigma) with the true sigma and with "
        "sigma estimated from the image (blind, as the model is). 'noise-free input': each method applied to the "
        "truth itself, RMS change inside the body (0 is ideal)."),
    "superres": (
        "Thin-slice truth on an oblique grid (0.6-0.9 mm in-plane, 0.8-1.0 mm slices); the input is its slab means "
        "over factor slices (a box slice profile), on the grid with factor x thicker slices. Output vs the thin "
        "truth, PSNR / SSIM / edge sharpness as for denoising. Slab-mean error: the output's own slab means vs the "
        "thick input, over input voxels inside the window and the body (0 = the output explains its input)."),
}


def _skimage() -> bool:
    try:
        import skimage.restoration  # noqa: F401
    except ImportError:
        return False
    return True


def _image_rows(ctx, family, section, condition, method, case_name, image, truth, window, body, spacing, edges,
                **extra) -> None:
    values = {"psnr_db": metrics.windowed_psnr(image, truth, window, body)}
    if _skimage():
        values["ssim"] = metrics.windowed_ssim(image, truth, window, body)
    lo, hi = window
    values["edge_ratio"] = metrics.edge_sharpness_ratio(np.clip(image, lo, hi), np.clip(truth, lo, hi), spacing,
                                                        edges)
    ctx.add(family, section, condition, method, case_name, **values, **extra)


def _truth_edges(truth, window, spacing, body):
    return metrics.edge_mask(np.clip(truth, *window), spacing, body)


def _tuned_sigma(ctx, family: str, region: str, level: float) -> float:
    key = f"{family} {region} {level:g} HU"
    if key not in ctx.meta.setdefault("gaussian_sigma_mm", {}):
        seed = tuning_seed(ctx.opts.seed_start, region)
        tune = ctx._cases.get(("tune", family, region))
        if tune is None:
            tune = make_case(family, region, seed, clinical_grid(region, seed, ctx.opts.fov_mm))
            ctx._cases[("tune", family, region)] = tune
        noisy = tune.noisy(level, seed + 2)
        sigma, _ = baselines.tune_gaussian_sigma(noisy, tune.clean_hu, region, tune.spacing_kji, tune.body)
        ctx.meta["gaussian_sigma_mm"][key] = sigma
        ctx.log(f"Gaussian sigma {family} {region} {level:g} HU: {sigma:g} mm (tuning seed {seed})")
    return ctx.meta["gaussian_sigma_mm"][key]


def run_denoise(ctx, family: str) -> None:
    from ..tasks import TaskRequest

    opts = ctx.opts
    nlm = opts.nlm and _skimage()
    if opts.nlm and not nlm:
        ctx.notes.append("non-local means and SSIM skipped: scikit-image is not installed")
    bm4d = baselines.bm4d_version() if opts.bm4d else None
    if opts.bm4d and bm4d is None and not any("BM4D" in n for n in ctx.notes):
        ctx.notes.append("BM4D skipped: the optional 'bm4d' package is not installed (pip install bm4d; free for "
                         "non-commercial use only)")
    for i in range(opts.cases):
        case = ctx.case(family, i)
        region, spacing, body = case.region, case.spacing_kji, case.body
        window = preprocessing.window_bounds(region)
        edges = _truth_edges(case.clean_hu, window, spacing, body)
        truth = case.clean_hu
        for j, level in enumerate(opts.noise_levels_hu):
            condition = f"{level:g} HU noise"
            noisy = case.noisy(level, case.seed + 2 + j)
            sigma_g = _tuned_sigma(ctx, family, region, level)
            outputs = [("noisy input", noisy, None, {})]
            t0 = time.monotonic()
            outputs.append(("Gaussian (tuned sigma)", baselines.gaussian_denoise(noisy, region, sigma_g, spacing),
                            time.monotonic() - t0, {}))
            estimated = baselines.estimate_noise_sigma(noisy) if (nlm or bm4d) else None
            if nlm:
                for name, sigma in (("non-local means, true sigma", level),
                                    ("non-local means, estimated sigma", estimated)):
                    t0 = time.monotonic()
                    outputs.append((name, baselines.nlm_denoise(noisy, region, sigma), time.monotonic() - t0,
                                    {"sigma_hu": sigma}))
            if bm4d:
                t0 = time.monotonic()
                outputs.append(("BM4D, estimated sigma", baselines.bm4d_denoise(noisy, region, estimated),
                                time.monotonic() - t0, {"sigma_hu": estimated}))
            res, secs = ctx.run_model("denoise", TaskRequest(image=case.volume(noisy), region=region,
                                                             params=ctx.params("denoise")))
            outputs.append(("model (DiffPIR)", primary_volume("denoise", res).array, secs,
                            {"sigma_hu": res.scores.get("noise_level_hu")}))
            for method, image, seconds, extra in outputs:
                timing = {} if seconds is None else {"seconds": seconds}
                _image_rows(ctx, family, "denoise", condition, method, case.name, image, truth, window, body,
                            spacing, edges, **extra, **timing)
            ctx.log(f"denoise {case.name} {condition}: model {secs:.1f} s")
        # the identity check: what each method does to an image without noise
        condition = "noise-free input"
        clean_outputs = [("Gaussian (tuned sigma)", baselines.gaussian_denoise(
            truth, region, _tuned_sigma(ctx, family, region, min(opts.noise_levels_hu)), spacing))]
        if nlm:
            clean_outputs.append(("non-local means, estimated sigma",
                                  baselines.nlm_denoise(truth, region, baselines.estimate_noise_sigma(truth))))
        res, _ = ctx.run_model("denoise", TaskRequest(image=case.volume(), region=region, params=ctx.params("denoise")))
        clean_outputs.append(("model (DiffPIR)", primary_volume("denoise", res).array))
        for method, image in clean_outputs:
            ctx.add(family, "denoise", condition, method, case.name,
                    rms_change_hu=metrics.rms_difference(image, truth, body))


def run_superres(ctx, family: str) -> None:
    from ..tasks import TaskRequest

    opts = ctx.opts
    for factor in opts.superres_factors:
        condition = (f"{factor}x thinner slices ({factor * SUPERRES_THIN_MM[0]:g}-{factor * SUPERRES_THIN_MM[1]:g} mm "
                     f"-> {SUPERRES_THIN_MM[0]:g}-{SUPERRES_THIN_MM[1]:g} mm)")
        for i in range(opts.cases):
            region = case_region(i)
            seed = ctx.case(family, i).seed
            thin = make_case(family, region, seed, superres_grid(region, seed, opts.fov_mm, factor))
            truth, spacing, body = thin.clean_hu, thin.spacing_kji, thin.body
            window = preprocessing.window_bounds(region)
            thick = metrics.slab_means(truth, factor).astype(np.float32)
            thick_matrix, thick_shape = regrid(thin.ijk_to_ras, truth.shape, spacing * np.array([factor, 1, 1]))
            assert tuple(thick_shape) == thick.shape
            thick_inside = ~preprocessing.outside_window(thick, region) & metrics.slab_means(body, factor).astype(bool)
            edges = _truth_edges(truth, window, spacing, body)
            res, secs = ctx.run_model("superres", TaskRequest(
                image=Volume(thick, thick_matrix), region=region,
                params=ctx.params("superres", factor=superres_factor_param(factor))))
            out = primary_volume("superres", res)
            image = out.array
            if out.shape != truth.shape or not np.allclose(out.ijk_to_ras, thin.ijk_to_ras, atol=1e-4):
                ctx.notes.append(f"super-resolution {thin.name}: the output grid is not the thin-slice grid; "
                                 "resampled onto it (linear) before measuring")
                image = preprocessing.resample_to_grid(image, out.ijk_to_ras, truth.shape, thin.ijk_to_ras, order=1)
            outputs = [("model (ControlNet)", image, secs)]
            for method, order in (("linear interpolation", 1), ("cubic interpolation", 3)):
                t0 = time.monotonic()
                outputs.append((method, baselines.interpolate(thick, thick_matrix, truth.shape, thin.ijk_to_ras,
                                                              order), time.monotonic() - t0))
            t0 = time.monotonic()
            outputs.append((PARABOLIC, baselines.parabolic_slabs(thick, factor), time.monotonic() - t0))
            t0 = time.monotonic()
            outputs.append((SLAB_TV, baselines.tv_slabs(thick, factor, spacing), time.monotonic() - t0))
            weights = {"model_weight": res.scores["model_weight"]} if "model_weight" in res.scores else {}
            for method, img, seconds in outputs:
                max_err, rms_err = metrics.slab_mean_error(img, thick, factor, thick_inside)
                _image_rows(ctx, family, "superres", condition, method, thin.name, img, truth, window, body, spacing,
                            edges, slab_max_error_hu=max_err, slab_rms_error_hu=rms_err, seconds=seconds,
                            **(weights if method == outputs[0][0] else {}))
            ctx.log(f"superres {thin.name} {factor}x: model {secs:.1f} s")
