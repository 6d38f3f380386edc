"""The README's main job, end to end with tiny models on a small held-out case: the numbers it
prints are real (recomputed here from the files it writes) and within their bounds."""

import json

import numpy as np
import pytest

from MedDiffFMLib import io, metrics, preprocessing
from MedDiffFMLib.demo import coronal, run_demo

FOV = (10.0, 24.0, 24.0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_model_dir, tiny_controlnet_dirs):
    out = tmp_path_factory.mktemp("demo")
    results = run_demo(out, model=tiny_model_dir, device="cpu", progress=False,
                       superres_controlnet=tiny_controlnet_dirs["superres"], fov_mm=FOV)
    return out, results


def test_demo_numbers_are_measured_and_within_bounds(demo):
    out, results = demo
    d, a, s = results["denoise"], results["anomaly"], results["superres"]
    for value in (*d.values(), *a.values(), *s.values()):
        assert np.all(np.isfinite(value))
    # the classical baseline does denoise; the model's number is whatever it measured
    assert d["psnr_nlm_estimated_sigma_db"] > d["psnr_noisy_db"]
    assert d["spacing_kji_mm"][1] == pytest.approx(0.78) and d["spacing_kji_mm"][0] == pytest.approx(2.5)
    assert 0.0 <= a["voxel_auroc_model"] <= 1.0 and a["lesion_voxels"] > 0
    assert a["voxel_auroc_organ_median"] > 0.6  # the baseline sees the lesions
    assert 0.0 <= a["dice_model"] <= 1.0
    assert s["factor"] == 3 and s["input_slice_mm"] == pytest.approx(3 * s["output_slice_mm"])
    assert s["slab_max_error_cubic_hu"] > 0
    assert abs(s["psnr_tv_slabs_db"] - s["psnr_cubic_db"]) < 3.0  # both measured on the same thin truth
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert saved["denoise"]["psnr_model_db"] == pytest.approx(d["psnr_model_db"])
    assert saved["anomaly"]["voxel_auroc_model"] == pytest.approx(a["voxel_auroc_model"])


def test_demo_psnr_is_recomputed_from_the_written_volumes(demo):
    out, results = demo
    noisy, denoised = io.read_volume(out / "denoise_input.nii.gz"), io.read_volume(out / "denoise_output.nii.gz")
    truth = io.read_volume(out / "denoise_truth.nii.gz")
    assert noisy.shape == denoised.shape == truth.shape
    np.testing.assert_allclose(noisy.ijk_to_ras, denoised.ijk_to_ras, atol=1e-4)
    body = io.read_volume(out / "denoise_body.nii.gz").array > 0
    window = preprocessing.window_bounds("abdomen")
    assert metrics.windowed_psnr(denoised.array, truth.array, window, body) == pytest.approx(
        results["denoise"]["psnr_model_db"], abs=1e-3)
    assert metrics.windowed_psnr(noisy.array, truth.array, window, body) == pytest.approx(
        results["denoise"]["psnr_noisy_db"], abs=1e-3)
    lr, sr = io.read_volume(out / "superres_input.nii.gz"), io.read_volume(out / "superres_output.nii.gz")
    assert sr.shape == (3 * lr.shape[0], lr.shape[1], lr.shape[2])
    np.testing.assert_allclose(sr.ijk_to_ras[:3, :2], lr.ijk_to_ras[:3, :2], atol=1e-4)  # in-plane kept
    for name in ("denoise", "anomaly", "superres"):
        assert (out / f"{name}.png").is_file()


def test_coronal_preview_shows_slices_at_their_thickness():
    volume = np.arange(3, dtype=np.float32)[:, None, None] * np.ones((3, 2, 5), np.float32)
    plane = coronal(volume, (2.0, 1.0, 0.5), j=1)
    assert plane.shape == (12, 5)  # 3 slices x 2 mm at 0.5 mm pixels
    assert plane[:4, 0].tolist() == [2.0] * 4 and plane[-4:, 0].tolist() == [0.0] * 4  # superior at the top
