"""The README's first command: three tasks on a held-out case at a clinical voxel size.

Denoising, anomaly detection and super-resolution run with the registered weights on cases
of the independent held-out phantom family (:mod:`MedDiffFMLib.heldout`) on oblique grids
of 0.78 x 0.78 mm in-plane and 2.5 mm slices (super-resolution: 3 mm slices made from a
1 mm truth), each next to its classical baseline. Writes NIfTI volumes, PNG previews
(input | output | difference; a coronal cut for super-resolution, so the slice direction
shows) and ``results.json``; prints the numbers. Whatever the weights, the numbers are what
was measured: a model that loses to its baseline is shown losing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import io, metrics, preprocessing
from .benchmark import baselines
from .benchmark.cases import clinical_grid, make_case
from .benchmark.task_facts import primary_segmentation, primary_volume, superres_factor_param
from .geometry import regrid
from .volume import Volume

HELD_OUT_SEED = 100_001  # any seed is unseen for the held-out family; the CLI uses this one too
FOV_MM = (30.0, 120.0, 120.0)  # (k, j, i): small enough for two minutes on two cores
INPLANE_MM = 0.78
SLICE_MM = 2.5
NOISE_HU = 25.0
SUPERRES_FACTOR = 3
# Reverse steps per task: the three tasks finish in under two minutes on a 2-core CPU.
DEMO_STEPS = {"denoise": 1, "anomaly": 10, "superres": 3}


def _grid(region: str, seed: int, fov_mm, slice_mm: float, multiple_of: int = 1):
    matrix, shape = clinical_grid(region, seed, fov_mm, slice_mm=slice_mm, slices_multiple_of=multiple_of)
    # the demo's voxel size is fixed (clinical_grid draws the in-plane spacing): rescale the in-plane columns
    scale = INPLANE_MM / np.linalg.norm(matrix[:3, 0])
    centre = matrix[:3, :3] @ ((np.array(shape[::-1]) - 1.0) / 2.0) + matrix[:3, 3]
    matrix[:3, :2] *= scale
    shape = (shape[0], int(round(fov_mm[1] / INPLANE_MM)), int(round(fov_mm[2] / INPLANE_MM)))
    matrix[:3, 3] = centre - matrix[:3, :3] @ ((np.array(shape[::-1]) - 1.0) / 2.0)
    return matrix, shape


def _u8(plane: np.ndarray, kind: str, region: str, diff_range_hu: float = 100.0) -> np.ndarray:
    if kind == "difference":
        return (np.clip(plane / diff_range_hu, -1, 1) * 127.5 + 127.5).astype(np.uint8)
    if kind == "map":
        return (np.clip(plane / max(float(plane.max()), 1e-6), 0, 1) * 255).astype(np.uint8)
    lo, hi = preprocessing.window_bounds(region)
    return (np.clip((plane - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def write_preview(path: Path, panels: Sequence[tuple[str, np.ndarray]], region: str) -> None:
    """One PNG: 2-D planes side by side. Panel kinds: "ct" (region window), "difference"
    (centred grey, +-100 HU) and "map" (scaled to its maximum)."""
    import SimpleITK as sitk

    tiles = [_u8(np.asarray(plane, dtype=np.float32), kind, region) for kind, plane in panels]
    h = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 4))) for t in tiles]
    image = np.concatenate(tiles, axis=1)
    scale = int(np.clip(np.ceil(256 / h), 1, 4))  # flat coronal cuts and small volumes: enlarge for viewing
    image = np.kron(image, np.ones((scale, scale), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(image), str(path))


def coronal(volume: np.ndarray, spacing_kji, j: int) -> np.ndarray:
    """The (k, i) plane at row ``j``, stretched along k to square pixels (nearest neighbour),
    superior at the top: thick slices show as blocks."""
    sk, _, si = (float(s) for s in spacing_kji)
    rows = max(1, int(round(volume.shape[0] * sk / si)))
    source = np.minimum((np.arange(rows) + 0.5) * si / sk, volume.shape[0] - 1e-6).astype(int)
    return volume[source, j][::-1]


def run_demo(output: str | Path = "demo_output", model=None, device: str = "auto", seed: int = HELD_OUT_SEED,
             progress: bool = True, superres_controlnet=None, fov_mm: Sequence[float] = FOV_MM) -> dict:
    """Run the demo; returns the measured numbers (also written to ``output/results.json``).

    Returns:
        ``{"model", "seed", "denoise": {...}, "anomaly": {...}, "superres": {...}}``; each task
        gives the model's numbers next to its baseline's (PSNR in dB inside the body with the
        region window, voxel AUROC, slab-mean error in HU), and its ``seconds``.
    """
    from .tasks import TaskRequest, run_task
    from .tasks.common import resolve_model_dir

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_model_dir(model, kind="base")
    results: dict = {"model": str(base_dir), "seed": int(seed)}
    lines = []
    report = _Progress(progress)

    # 1. denoising: low-dose-like noise on an abdomen case
    case = make_case("heldout", "abdomen", seed, _grid("abdomen", seed, fov_mm, SLICE_MM))
    window, body = preprocessing.window_bounds(case.region), case.body
    noisy = case.noisy(NOISE_HU, seed + 1)
    t0 = time.monotonic()
    res = run_task("denoise", TaskRequest(image=case.volume(noisy), region=case.region,
                                          params={"steps": DEMO_STEPS["denoise"]}), base_dir, device=device,
                   progress=report.stage("denoise"))
    seconds = time.monotonic() - t0
    denoised = primary_volume("denoise", res).array
    nlm = baselines.nlm_denoise(noisy, case.region, baselines.estimate_noise_sigma(noisy))
    psnr = {name: metrics.windowed_psnr(img, case.clean_hu, window, body)
            for name, img in (("noisy", noisy), ("model", denoised), ("nlm", nlm))}
    results["denoise"] = {"spacing_kji_mm": case.spacing_kji.tolist(), "noise_hu": NOISE_HU,
                          "psnr_noisy_db": psnr["noisy"], "psnr_model_db": psnr["model"],
                          "psnr_nlm_estimated_sigma_db": psnr["nlm"], "seconds": seconds}
    lines.append(("denoise", f"PSNR noisy {psnr['noisy']:.2f} dB -> model {psnr['model']:.2f} dB; non-local means "
                             f"(blind) {psnr['nlm']:.2f} dB", seconds))
    k = case.clean_hu.shape[0] // 2
    io.write_volume(out / "denoise_input.nii.gz", case.volume(noisy))
    io.write_volume(out / "denoise_output.nii.gz", primary_volume("denoise", res))
    io.write_volume(out / "denoise_truth.nii.gz", case.volume())
    io.write_volume(out / "denoise_body.nii.gz", Volume(body.astype(np.uint8), case.ijk_to_ras))
    write_preview(out / "denoise.png", [("ct", noisy[k]), ("ct", denoised[k]), ("difference", denoised[k] - noisy[k])],
                  case.region)

    # 2. anomaly detection: two lesions, the label map as the anatomy condition
    case = make_case("heldout", "abdomen", seed + 2, _grid("abdomen", seed + 2, fov_mm, SLICE_MM), lesions=2)
    body = case.body
    image = case.noisy(12.0, seed + 3)
    t0 = time.monotonic()
    res = run_task("anomaly", TaskRequest(image=case.volume(image), region=case.region, anatomy=case.label_volume(),
                                          anatomy_names=case.label_names, params={"steps": DEMO_STEPS["anomaly"]}),
                   base_dir, device=device, progress=report.stage("anomaly"))
    seconds = time.monotonic() - t0
    amap = primary_volume("anomaly", res).array
    baseline = baselines.zscore_by_tissue(baselines.organ_deviation_map(image, case.labels, case.region, 1.5,
                                                                        case.spacing_kji), case.labels,
                                          case.label_names)
    auroc_model = metrics.auroc(amap[body], case.lesion_mask[body])
    auroc_baseline = metrics.auroc(baseline[body], case.lesion_mask[body])
    mask = np.asarray(primary_segmentation("anomaly", res).array, dtype=bool)
    results["anomaly"] = {"lesion_voxels": int(case.lesion_mask.sum()), "voxel_auroc_model": auroc_model,
                          "voxel_auroc_organ_median": auroc_baseline,
                          "dice_model": metrics.dice(mask, case.lesion_mask), "seconds": seconds}
    lines.append(("anomaly", f"voxel AUROC model {auroc_model:.3f}; organ-median baseline {auroc_baseline:.3f}",
                  seconds))
    kl = int(np.argmax(case.lesion_mask.sum(axis=(1, 2))))
    io.write_volume(out / "anomaly_input.nii.gz", case.volume(image))
    io.write_volume(out / "anomaly_map.nii.gz", primary_volume("anomaly", res))
    io.write_volume(out / "anomaly_mask.nii.gz", Volume(mask.astype(np.uint8), case.ijk_to_ras))
    write_preview(out / "anomaly.png", [("ct", image[kl]), ("map", amap[kl]), ("map", baseline[kl])], case.region)

    # 3. super-resolution: 3 mm slices made from a 1 mm chest truth
    results["superres"] = _superres(out, base_dir, superres_controlnet, seed + 4, fov_mm, device, report, lines)
    report.close()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"\nMedDiffFM demo on held-out phantoms (seed {seed}) at {INPLANE_MM} x {INPLANE_MM} mm in-plane, oblique; "
          f"model {base_dir}")
    print("Demonstration weights trained on synthetic phantoms: not for clinical use. Each line shows the model next "
          "to a classical baseline, as measured.")
    for name, text, secs in lines:
        print(f"  {name:<9} {text}  [{secs:.1f} s]")
    print(f"Outputs (NIfTI + PNG previews: input | output | difference) in {out}/")
    return results


def _superres(out: Path, base_dir, controlnet, seed: int, fov_mm, device, report, lines) -> Optional[dict]:
    from .tasks import TaskRequest, run_task
    from .tasks.common import resolve_model_dir

    try:
        cn_dir = resolve_model_dir(controlnet, kind="controlnet", task="superres")
    except (FileNotFoundError, ValueError) as e:
        lines.append(("superres", f"skipped: {e}", 0.0))
        return None
    f = SUPERRES_FACTOR
    case = make_case("heldout", "chest", seed, _grid("chest", seed, fov_mm, 1.0, multiple_of=f))
    truth, spacing, body = case.clean_hu, case.spacing_kji, case.body
    window = preprocessing.window_bounds(case.region)
    thick = metrics.slab_means(truth, f).astype(np.float32)
    thick_matrix, _ = regrid(case.ijk_to_ras, truth.shape, spacing * np.array([f, 1, 1]))
    t0 = time.monotonic()
    try:
        res = run_task("superres", TaskRequest(image=Volume(thick, thick_matrix), region=case.region,
                                               params={"steps": DEMO_STEPS["superres"],
                                                       "factor": superres_factor_param(f)}),
                       base_dir, controlnet=cn_dir, device=device, progress=report.stage("superres"))
    except ValueError as e:  # e.g. a registered ControlNet this version refuses: say so, keep the other results
        lines.append(("superres", f"skipped: {e}", 0.0))
        return None
    seconds = time.monotonic() - t0
    sr = primary_volume("superres", res)
    if sr.shape != truth.shape or not np.allclose(sr.ijk_to_ras, case.ijk_to_ras, atol=1e-4):
        raise RuntimeError(f"super-resolution returned grid {sr.shape} instead of the thin grid {truth.shape}")
    cubic = baselines.interpolate(thick, thick_matrix, truth.shape, case.ijk_to_ras, 3)
    tv = baselines.tv_slabs(thick, f, spacing)
    inside = ~preprocessing.outside_window(thick, case.region) & metrics.slab_means(body, f).astype(bool)
    numbers = {"factor": f, "input_slice_mm": float(spacing[0] * f), "output_slice_mm": float(spacing[0]),
               "psnr_model_db": metrics.windowed_psnr(sr.array, truth, window, body),
               "psnr_cubic_db": metrics.windowed_psnr(cubic, truth, window, body),
               "psnr_tv_slabs_db": metrics.windowed_psnr(tv, truth, window, body),
               "slab_max_error_model_hu": metrics.slab_mean_error(sr.array, thick, f, inside)[0],
               "slab_max_error_cubic_hu": metrics.slab_mean_error(cubic, thick, f, inside)[0], "seconds": seconds}
    lines.append(("superres", f"{numbers['input_slice_mm']:.1f} -> {numbers['output_slice_mm']:.1f} mm slices: PSNR "
                              f"model {numbers['psnr_model_db']:.2f} dB, cubic {numbers['psnr_cubic_db']:.2f} dB, "
                              f"total-variation slabs {numbers['psnr_tv_slabs_db']:.2f} dB; "
                              f"slab-mean error model {numbers['slab_max_error_model_hu']:.1f} HU", seconds))
    io.write_volume(out / "superres_input.nii.gz", Volume(thick, thick_matrix))
    io.write_volume(out / "superres_output.nii.gz", sr)
    j = truth.shape[1] // 2
    thick_spacing = spacing * np.array([f, 1, 1])
    write_preview(out / "superres.png", [("ct", coronal(thick, thick_spacing, j)), ("ct", coronal(sr.array, spacing, j)),
                                         ("ct", coronal(cubic, spacing, j)),
                                         ("difference", coronal(sr.array - truth, spacing, j))], case.region)
    return numbers


class _Progress:
    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled

    def stage(self, name: str):
        if not self.enabled:
            return None
        from tqdm.auto import tqdm

        self.close()
        self.bar = tqdm(total=100, desc=name, unit="%", dynamic_ncols=True, leave=False)

        def update(p):
            self.bar.n = int(100 * min(1.0, p.fraction))
            self.bar.refresh()

        return update

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
