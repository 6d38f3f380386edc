"""The README's first command: three tasks on a held-out phantom with the bundled weights.

Denoising (a low-dose-like noisy phantom), anomaly detection (a phantom with inserted
lesions, its label map given as the anatomy condition, as a TotalSegmentator result would
be) and super-resolution (a thick-slice version of a phantom). Writes NIfTI volumes and PNG
previews (input | output | difference) and prints one table with the numbers measured.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


import numpy as np

from . import io, metrics, preprocessing
from .geometry import regrid
from .volume import Volume

HELD_OUT_SEED = 100_001  # training uses seeds below 10 000
FOV_MM = (192.0, 256.0, 256.0)
# Reverse steps per task: chosen so that the three tasks finish in under two minutes on a
# 2-core CPU with the demo weights (the tasks' own defaults favour quality over speed).
DEMO_STEPS = {"denoise": 2, "anomaly": 10, "superres": 8}


def _window_u8(hu: np.ndarray, region: str) -> np.ndarray:
    lo, hi = preprocessing.window_bounds(region)
    return (np.clip((hu - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def write_preview(path: Path, panels: list[tuple[str, np.ndarray]], region: str, k: int,
                  diff_range_hu: float = 100.0) -> None:
    """One PNG of axial slice ``k`` of each panel side by side. Panels named "difference" are
    shown centred on grey (+-diff_range_hu); "map" panels are scaled to their own maximum."""
    import SimpleITK as sitk

    tiles = []
    for name, vol in panels:
        sl = vol[min(k, vol.shape[0] - 1)].astype(np.float32)
        if name == "difference":
            tile = (np.clip(sl / diff_range_hu, -1, 1) * 127.5 + 127.5).astype(np.uint8)
        elif name == "map":
            tile = (np.clip(sl / max(float(sl.max()), 1e-6), 0, 1) * 255).astype(np.uint8)
        else:
            tile = _window_u8(sl, region)
        tiles.append(tile)
    h = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 4))) for t in tiles]
    img = np.concatenate(tiles, axis=1)
    scale = max(1, 384 // h)  # small volumes: enlarge for viewing
    img = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(img), str(path))


def _psnr_window(pred, target, region, mask):
    lo, hi = preprocessing.window_bounds(region)
    return metrics.psnr(np.clip(pred, lo, hi), np.clip(target, lo, hi), data_range=hi - lo, mask=mask)


def run_demo(output: str | Path = "demo_output", model=None, device: str = "auto", seed: int = HELD_OUT_SEED,
             progress: bool = True, superres_controlnet=None, fov_mm=FOV_MM) -> dict:
    """Run the demo; returns the measured numbers (also written to ``output/results.json``).

    Args:
        model / superres_controlnet: model directories or registry ids (None: the bundled ones).
        fov_mm: phantom field of view (k, j, i) in mm; the phantoms are made on the model's grid.
    """
    from .checkpoint import read_config
    from .phantoms import add_ct_noise, make_phantom
    from .tasks import TaskRequest, run_task
    from .tasks.common import resolve_model_dir

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    base_dir = resolve_model_dir(model, kind="base")
    spacing = float(read_config(base_dir)["spacing_mm"])
    shape = tuple(int(round(f / spacing)) for f in fov_mm)
    sp = (spacing,) * 3
    results: dict = {"model": str(base_dir), "seed": seed, "shape_kji": shape, "spacing_mm": spacing}
    bar = _Bar(progress)
    rows = []

    # 1. denoising: a clean phantom with low-dose-like noise
    region = "abdomen"
    ph = make_phantom(region, shape_kji=shape, spacing_kji=sp, seed=seed, noise_hu=0.0)
    noisy = add_ct_noise(ph.clean_hu, 30.0, seed=seed + 1, spacing_kji=sp).astype(np.float32)
    t0 = time.monotonic()
    res = run_task("denoise", TaskRequest(image=Volume(noisy, ph.ijk_to_ras), region=region,
                                          params={"steps": DEMO_STEPS["denoise"]}), base_dir,
                   device=device, progress=bar.stage("denoise"))
    den = res.volumes["denoised"].array
    body = ph.labels > 0
    p_in, p_out = _psnr_window(noisy, ph.clean_hu, region, body), _psnr_window(den, ph.clean_hu, region, body)
    results["denoise"] = {"psnr_noisy": p_in, "psnr_denoised": p_out, "seconds": time.monotonic() - t0,
                          **res.scores}
    rows.append(("denoise", f"PSNR {p_in:.2f} -> {p_out:.2f} dB (noise estimated {res.scores['noise_level_hu']:.1f} "
                            f"HU, true 30)", time.monotonic() - t0))
    k = shape[0] // 2
    io.write_volume(out / "denoise_input.nii.gz", Volume(noisy, ph.ijk_to_ras))
    io.write_volume(out / "denoise_output.nii.gz", res.volumes["denoised"])
    write_preview(out / "denoise.png", [("input", noisy), ("output", den), ("difference", den - noisy)], region, k)

    # 2. anomaly detection: inserted lesions, the label map as anatomy condition
    ph = make_phantom(region, shape_kji=shape, spacing_kji=sp, seed=seed + 2, lesions=2, noise_hu=12.0)
    t0 = time.monotonic()
    res = run_task("anomaly", TaskRequest(image=ph.volume(), region=region, anatomy=ph.label_volume(),
                                          anatomy_names=ph.label_names, params={"steps": DEMO_STEPS["anomaly"]}),
                   base_dir, device=device,
                   progress=bar.stage("anomaly"))
    amap = res.volumes["anomaly_map"].array
    body = ph.labels > 0
    auroc = metrics.auroc(amap[body], ph.lesion_mask[body]) if ph.lesion_mask.any() else float("nan")
    dice = metrics.dice(res.segmentations["anomaly"].array, ph.lesion_mask)
    results["anomaly"] = {"voxel_auroc": auroc, "dice": dice, "seconds": time.monotonic() - t0, **res.scores}
    rows.append(("anomaly", f"voxel AUROC {auroc:.3f}, mask Dice {dice:.3f}, score {res.scores['anomaly_score']:.3f}",
                 time.monotonic() - t0))
    kl = int(np.argmax(ph.lesion_mask.sum(axis=(1, 2)))) if ph.lesion_mask.any() else k
    io.write_volume(out / "anomaly_input.nii.gz", ph.volume())
    io.write_volume(out / "anomaly_map.nii.gz", res.volumes["anomaly_map"])
    io.write_volume(out / "anomaly_mask.nii.gz", Volume(res.segmentations["anomaly"].array.astype(np.uint8),
                                                        ph.ijk_to_ras))
    write_preview(out / "anomaly.png", [("input", ph.hu), ("reconstruction", res.volumes["reconstruction"].array),
                                        ("map", amap)], region, kl)

    # 3. super-resolution: a thick-slice acquisition of a chest phantom
    try:
        cn_dir = resolve_model_dir(superres_controlnet, kind="controlnet", task="superres")
    except (FileNotFoundError, ValueError) as e:
        rows.append(("superres", f"skipped: {e}", 0.0))
    else:
        region = "chest"
        factor = tuple(int(f) for f in read_config(cn_dir)["params"]["factor"])
        ph = make_phantom(region, shape_kji=shape, spacing_kji=sp, seed=seed + 3, noise_hu=0.0)
        n = [s // f for s, f in zip(shape, factor)]
        hr = ph.clean_hu[: n[0] * factor[0], : n[1] * factor[1], : n[2] * factor[2]]
        lr = hr.reshape(n[0], factor[0], n[1], factor[1], n[2], factor[2]).mean(axis=(1, 3, 5)).astype(np.float32)
        lr_matrix, _ = regrid(ph.ijk_to_ras, hr.shape, np.array(sp) * np.array(factor))
        t0 = time.monotonic()
        res = run_task("superres", TaskRequest(image=Volume(lr, lr_matrix), region=region,
                                               params={"steps": DEMO_STEPS["superres"]}), base_dir,
                       controlnet=cn_dir, device=device, progress=bar.stage("superres"))
        sr = res.volumes["superres"]
        cubic = preprocessing.resample_to_grid(lr, lr_matrix, sr.shape, sr.ijk_to_ras, order=3)
        body = ph.labels[: hr.shape[0], : hr.shape[1], : hr.shape[2]] > 0
        p_sr, p_cu = _psnr_window(sr.array, hr, region, body), _psnr_window(cubic, hr, region, body)
        results["superres"] = {"factor": factor, "psnr_model": p_sr, "psnr_cubic": p_cu,
                               "seconds": time.monotonic() - t0}
        rows.append(("superres", f"{factor[0]}x slices: PSNR {p_sr:.2f} dB vs cubic {p_cu:.2f} dB",
                     time.monotonic() - t0))
        io.write_volume(out / "superres_input.nii.gz", Volume(lr, lr_matrix))
        io.write_volume(out / "superres_output.nii.gz", sr)
        up = np.repeat(lr, factor[0], axis=0)
        kk = sr.shape[0] // 2
        write_preview(out / "superres.png", [("input", up), ("output", sr.array), ("difference", sr.array - cubic)],
                      region, kk)
    bar.close()
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n", encoding="utf-8")
    print(f"\nMedDiffFM demo on held-out phantoms (seed {seed}), model {base_dir}")
    print("These are demonstration weights trained on synthetic phantoms: not for clinical use.")
    for name, text, secs in rows:
        print(f"  {name:<9} {text}  [{secs:.1f} s]")
    print(f"Outputs (NIfTI + PNG previews: input | output | difference) in {out}/")
    print("Other tasks: meddiff-fm synthesize | lesion | inpaint --help  (e.g. meddiff-fm phantom -o p.nii.gz, then "
          "meddiff-fm inpaint p.nii.gz --mask p_lesions.nii.gz)")
    return results


class _Bar:
    def __init__(self, enabled: bool):
        self.bar = None
        self.enabled = enabled

    def stage(self, name: str):
        if not self.enabled:
            return None
        from tqdm.auto import tqdm

        if self.bar is not None:
            self.bar.close()
        self.bar = tqdm(total=100, desc=name, unit="%", dynamic_ncols=True, leave=False)

        def update(p):
            self.bar.n = int(100 * min(1.0, p.fraction))
            self.bar.refresh()

        return update

    def close(self):
        if self.bar is not None:
            self.bar.close()
