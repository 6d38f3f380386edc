"""The README's main job, end to end with tiny models on a small field of view."""

import json

import numpy as np
import pytest

from MedDiffFMLib import io
from MedDiffFMLib.demo import run_demo


def test_demo_writes_volumes_previews_and_measured_numbers(tmp_path, tiny_model_dir, tiny_controlnet_dirs, capsys):
    out = tmp_path / "demo"
    results = run_demo(out, model=tiny_model_dir, device="cpu", progress=False,
                       superres_controlnet=tiny_controlnet_dirs["superres"], fov_mm=(12.0, 24.0, 20.0))
    text = capsys.readouterr().out
    for name in ("denoise", "anomaly", "superres"):
        assert name in results and (out / f"{name}.png").is_file()
        assert name in text
    assert "not for clinical use" in text
    # the numbers are computed: the noisy input's PSNR is finite and the denoised one differs from it
    d = results["denoise"]
    assert np.isfinite(d["psnr_noisy"]) and np.isfinite(d["psnr_denoised"]) and d["psnr_noisy"] != d["psnr_denoised"]
    assert 0.0 <= results["anomaly"]["voxel_auroc"] <= 1.0
    assert results["superres"]["factor"] == (2, 1, 1)
    # outputs keep their input's geometry; super-resolution doubles the slices
    for task in ("denoise", "anomaly"):
        src = io.read_volume(out / f"{task}_input.nii.gz")
        dst = io.read_volume(out / ("denoise_output.nii.gz" if task == "denoise" else "anomaly_map.nii.gz"))
        assert src.shape == dst.shape
        np.testing.assert_allclose(src.ijk_to_ras, dst.ijk_to_ras, atol=1e-4)
    lr, sr = io.read_volume(out / "superres_input.nii.gz"), io.read_volume(out / "superres_output.nii.gz")
    assert sr.shape == (2 * lr.shape[0], lr.shape[1], lr.shape[2])
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["denoise"]["psnr_noisy"] == pytest.approx(d["psnr_noisy"])
