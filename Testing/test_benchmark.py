"""The benchmark: end to end with a tiny random model and tiny ControlNets on small phantoms,
and its baseline helpers one by one."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from MedDiffFMLib import benchmark as bm
from MedDiffFMLib import metrics, preprocessing

FOV = (16.0, 24.0, 24.0)  # mm; the tiny preset works at 1 mm, so 16 x 24 x 24 voxels
STEPS = {t: 2 for t in bm.ALL_TASKS}


# ------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def controlnets(tiny_model_dir, tmp_path_factory):
    """Tiny ControlNets (superres factor 2 1 1, lesion) initialised from the tiny base."""
    from MedDiffFMLib.checkpoint import load_base, save_model, sha256_file
    from MedDiffFMLib.networks import ControlNetConfig, TaskControlNet

    base = load_base(tiny_model_dir)
    sha = sha256_file(tiny_model_dir / "model.safetensors")
    root = tmp_path_factory.mktemp("benchmark_controlnets")
    out = {}
    for task, channels, params in (("superres", 1, {"factor": [2, 1, 1]}), ("lesion", 2, {})):
        cfg = ControlNetConfig(task=task, control_channels=channels, base=base.cfg, base_sha256=sha, params=params)
        cn = TaskControlNet(cfg)
        cn.init_from_base(base)
        out[task] = save_model(root / task, cfg, cn.state_dict())
    return out


def _options(**kw):
    base = dict(cases=1, fov_mm=FOV, steps=STEPS, device="cpu", bm4d=False, progress=False)
    base.update(kw)
    return bm.BenchmarkOptions(**base)


def _run(tiny_model_dir, controlnets, **kw):
    torch.set_num_threads(1)
    return bm.run_benchmark(tiny_model_dir, superres_controlnet=controlnets["superres"],
                            lesion_controlnet=controlnets["lesion"], options=_options(**kw))


@pytest.fixture(scope="module")
def result(tiny_model_dir, controlnets):
    return _run(tiny_model_dir, controlnets)


# ------------------------------------------------------------------------------- end to end
EXPECTED = (
    [("denoise", f"{lv:g} HU", m, metric) for lv in bm.NOISE_LEVELS_HU
     for m in ("noisy input", "Gaussian (tuned sigma)", "non-local means (3-D)", "model (DiffPIR)")
     for metric in ("psnr_db", "ssim")]
    + [("anomaly", "lesion cases", m, metric) for m in ("model (partial diffusion)", "organ-median deviation")
       for metric in ("voxel_auroc", "dice")]
    + [("anomaly", "healthy cases", m, "flagged_ml") for m in ("model (partial diffusion)", "organ-median deviation")]
    + [("anomaly", "all volumes", m, "volume_auroc") for m in ("model (partial diffusion)", "organ-median deviation")]
    + [("synthesis", "all groups (mean)", m, "threshold_dice")
       for m in ("model", "real phantom (ceiling)", "uniform (body mean)", "noise (body mean +- std)")]
    + [("superres", "2x1x1 (k, j, i)", m, metric) for m in ("model (ControlNet)", "trilinear", "cubic")
       for metric in ("psnr_db", "ssim")]
    + [("inpaint", f"content={c}", "model (RePaint + lesion ControlNet)", metric) for c in ("healthy", "lesion")
       for metric in ("outside_identical", "delta_mean_hu", "std_in_hu", "std_ring_hu")]
    + [("inpaint", "reference", "input (unchanged)", "delta_mean_hu")]
    + [("lesion", "generated", "model (lesion ControlNet)", metric)
       for metric in ("outside_identical", "contrast_hu", "threshold_dice")]
    + [("lesion", "reference", "input (no lesion)", "contrast_hu"),
       ("lesion", "reference", "phantom lesions (each)", "contrast_hu")]
)


def test_every_expected_row_is_present_and_finite(result):
    for key in EXPECTED:
        row = bm.find_row(result, *key)
        assert row is not None, f"missing row {key}"
        assert row["n"] >= 1 and row["mean"] is not None and math.isfinite(row["mean"]), (key, row)
    # synthesis reports at least one organ group per case, with both measures
    organs = {r["condition"] for r in result["rows"] if r["task"] == "synthesis"} - {"all groups (mean)"}
    assert organs
    for organ in organs:
        assert bm.find_row(result, "synthesis", organ, "model", "mean_hu_abs_error") is not None
    # every value that was measured is finite (AUROCs are defined: one lesion and one healthy volume)
    for r in result["rows"]:
        assert all(v is not None and math.isfinite(v) for v in r["values"]), r
    assert any("BM4D" in n for n in result["notes"])
    assert result["meta"]["superres_factor"] == [2, 1, 1]


def test_outside_mask_identity_is_exact(result):
    for cond in ("content=healthy", "content=lesion"):
        row = bm.find_row(result, "inpaint", cond, "model (RePaint + lesion ControlNet)", "outside_identical")
        assert row["values"] == [1.0]
    row = bm.find_row(result, "lesion", "generated", "model (lesion ControlNet)", "outside_identical")
    assert row["values"] == [1.0]


def test_noisy_input_psnr_matches_an_independent_computation(result):
    from MedDiffFMLib.phantoms import add_ct_noise, make_phantom

    # case 0: head_neck, phantom seed 100000, noise seeds 100002 (25 HU) and 100003 (40 HU)
    ph = make_phantom("head_neck", shape_kji=(16, 24, 24), spacing_kji=(1.0, 1.0, 1.0), seed=100_000, noise_hu=12.0)
    lo, hi = -150.0, 250.0  # head-and-neck window W400 / L50
    body = ph.labels > 0
    truth = np.clip(ph.clean_hu.astype(np.float64), lo, hi)
    for level, seed in ((25.0, 100_002), (40.0, 100_003)):
        noisy = add_ct_noise(ph.clean_hu, level, seed, (1.0, 1.0, 1.0))
        err = (np.clip(noisy.astype(np.float64), lo, hi) - truth)[body]
        expected = 10 * np.log10((hi - lo) ** 2 / np.mean(err ** 2))
        row = bm.find_row(result, "denoise", f"{level:g} HU", "noisy input", "psnr_db")
        assert row["values"][0] == pytest.approx(expected, rel=1e-9)
        assert row["cases"] == ["head_neck-100000"]


def test_baselines_are_deterministic(result, tiny_model_dir, controlnets):
    again = _run(tiny_model_dir, controlnets, tasks=("denoise", "anomaly", "synthesis", "superres", "lesion"))
    baseline = {"noisy input", "Gaussian (tuned sigma)", "non-local means (3-D)", "organ-median deviation",
                "real phantom (ceiling)", "uniform (body mean)", "noise (body mean +- std)", "trilinear", "cubic",
                "input (no lesion)", "phantom lesions (each)"}
    compared = 0
    for r in again["rows"]:
        if r["method"] in baseline and r["metric"] != "seconds":
            first = bm.find_row(result, r["task"], r["condition"], r["method"], r["metric"])
            assert first is not None and first["values"] == r["values"], (r, first)
            compared += 1
    assert compared >= 30


def test_tables_and_json(result, tmp_path):
    text = bm.format_table(result)
    for title in bm.SECTION_TITLES.values():
        assert f"== {title} ==" in text
    assert "model (DiffPIR)" in text and "organ-median deviation" in text
    md = bm.format_markdown(result)
    assert md.count("| condition | method |") == 6
    path = bm.write_json(result, tmp_path / "r.json")
    back = json.loads(path.read_text(encoding="utf-8"))
    assert len(back["rows"]) == len(result["rows"])


def test_controlnet_rows_skipped_with_a_note(tiny_model_dir, monkeypatch):
    from MedDiffFMLib import weights

    monkeypatch.setattr(weights, "default_model_id", lambda kind="base", task=None: None)
    res = bm.run_benchmark(tiny_model_dir, options=_options(tasks=("superres", "inpaint", "lesion")))
    assert res["rows"] == []
    assert any("super-resolution skipped" in n for n in res["notes"])
    assert any("inpainting and lesion generation skipped" in n for n in res["notes"])
    # a ControlNet named by the caller that does not exist is an error, not a skip
    with pytest.raises(ValueError, match="superres ControlNet"):
        bm.run_benchmark(tiny_model_dir, superres_controlnet=str(tiny_model_dir.parent / "missing"),
                         options=_options(tasks=("superres",)))


def test_cli_benchmark(tiny_model_dir, tmp_path, capsys):
    from MedDiffFMLib.cli import main

    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["benchmark", "--model", str(tiny_model_dir), "--tasks", "denoise", "--cases", "1", "--fov", "16", "24",
               "24", "--steps", "1", "--noise-levels", "30", "--no-bm4d", "--no-nlm", "--device", "cpu", "--quiet",
               "-o", str(out), "--markdown", str(md)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "== Denoising ==" in printed and "30 HU" in printed
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["meta"]["steps"] == {"denoise": 1}
    assert {r["method"] for r in data["rows"]} == {"noisy input", "Gaussian (tuned sigma)", "model (DiffPIR)"}
    assert md.read_text(encoding="utf-8").startswith("# MedDiffFM benchmark")


# ------------------------------------------------------------------------------- helpers
def test_parse_steps_and_tasks():
    assert bm.parse_steps(["7"]) == {t: 7 for t in bm.ALL_TASKS}
    assert bm.parse_steps(["denoise=3", "synthesize=4"]) == {"denoise": 3, "synthesis": 4}
    assert bm.parse_tasks("lesion,denoise") == ["denoise", "lesion"]
    with pytest.raises(ValueError):
        bm.parse_tasks("denoise,segment")
    with pytest.raises(ValueError):
        bm.BenchmarkOptions(seed_start=5000)


def test_case_seeds_are_held_out_and_distinct():
    seen = set()
    for i in range(5):
        s = bm.case_seeds(bm.SEED_START, i)
        vals = [s["phantom"], s["lesion_phantom"], *s["noise"]]
        assert min(vals) >= 10_000 and not seen & set(vals)
        seen |= set(vals)
    for r in bm.REGIONS:
        t = bm.tuning_seeds(bm.SEED_START, r)
        assert not seen & {t["phantom"], *t["noise"]}


def test_gaussian_baseline_and_tuning():
    rng = np.random.default_rng(0)
    clean = np.full((12, 16, 16), 40.0, np.float32)
    clean[:, :, :2] = 900.0  # bone, outside the abdomen window
    noisy = (clean + 20 * rng.standard_normal(clean.shape)).astype(np.float32)
    out = bm.gaussian_denoise(noisy, "abdomen", 1.0)
    outside = preprocessing.outside_window(noisy, "abdomen")
    assert np.array_equal(out[outside], noisy[outside])  # voxels the window clips are kept
    assert np.array_equal(out, bm.gaussian_denoise(noisy, "abdomen", 1.0))
    flat = np.zeros(clean.shape, bool)
    flat[2:-2, 2:-2, 4:-2] = True
    assert out[flat].std() < 0.5 * noisy[flat].std()
    # a flat image is best smoothed hard; fine detail without noise is best left alone
    plain = np.full(clean.shape, 40.0, np.float32)
    plain_noisy = (plain + 20 * rng.standard_normal(clean.shape)).astype(np.float32)
    assert bm.tune_gaussian_sigma(plain_noisy, plain, "abdomen", flat)[0] == max(bm.GAUSSIAN_SIGMAS_VOX)
    checker = (np.indices(clean.shape).sum(0) % 2 * 200 - 50).astype(np.float32)
    assert bm.tune_gaussian_sigma(checker + 0.1, checker, "abdomen", flat)[0] == min(bm.GAUSSIAN_SIGMAS_VOX)


def test_nlm_and_noise_estimate():
    pytest.importorskip("skimage")
    rng = np.random.default_rng(1)
    clean = np.full((10, 20, 20), 50.0, np.float32)
    clean[:, 10:] = 120.0
    noisy = (clean + 15 * rng.standard_normal(clean.shape)).astype(np.float32)
    sigma, how = bm.estimate_noise_sigma(noisy, "abdomen")
    assert 10 < sigma < 20 and how
    out = bm.nlm_denoise(noisy, "abdomen", sigma)
    assert np.abs(out - clean).mean() < np.abs(noisy - clean).mean()


def test_windowed_psnr_clips_to_the_window():
    truth = np.zeros((8, 8, 8), np.float32)
    pred = truth.copy()
    pred[0, 0, 0] = 5000.0  # clipped to the abdomen window top (240 HU)
    mask = np.ones(truth.shape, bool)
    expected = 10 * np.log10(360.0 ** 2 / (240.0 ** 2 / truth.size))
    assert bm.windowed_psnr(pred, truth, "abdomen", mask) == pytest.approx(expected)


def test_organ_deviation_map_and_threshold():
    labels = np.zeros((16, 16, 16), np.uint8)
    labels[2:14, 2:14, 2:14] = 5  # liver
    hu = np.where(labels > 0, 60.0, -1000.0) + 3.0 * np.random.default_rng(2).standard_normal(labels.shape)
    hu = hu.astype(np.float32)
    hu[7:10, 7:10, 7:10] -= 50.0  # a hypodense lesion
    body = labels > 0
    amap = bm.organ_deviation_map(hu, labels, "abdomen", body)
    assert amap[~body].max() == 0.0
    assert np.unravel_index(np.argmax(amap), amap.shape) == (8, 8, 8)
    amap = bm.zscore_by_tissue(amap, labels, {5: "liver"}, body)
    assert np.unravel_index(np.argmax(amap), amap.shape) == (8, 8, 8)
    mask, thr = bm.threshold_anomaly_map(amap, body)
    truth = np.zeros_like(body)
    truth[7:10, 7:10, 7:10] = True
    # the 1-voxel smoothing spreads a 3-voxel lesion: all of it is found, with a halo
    assert (mask & truth).sum() == truth.sum() and metrics.dice(mask, truth) > 0.3 and thr > 0
    assert bm.anomaly_volume_score(amap, body) > thr


def test_nearest_mean_segmentation_and_groups():
    groups = np.zeros((6, 6, 6), np.int8)
    groups[1:5, 1:5, 1:5] = 1
    groups[2:4, 2:4, 2:4] = 7  # liver group
    hu = np.where(groups == 7, 60.0, np.where(groups == 1, -100.0, -1000.0)).astype(np.float32)
    body = groups > 0
    means = bm.class_means(hu, groups, body, "abdomen", [1, 7])
    assert means == {1: -100.0, 7: 60.0}
    seg = bm.nearest_mean_segmentation(hu + 10.0, means, body, "abdomen")
    assert np.array_equal(seg, groups)
    assert bm.main_groups(groups, body) == [1]  # the 8-voxel liver is under 10 voxels
    assert bm.group_name(7) == "liver" and bm.group_name(1) == "body tissue"


def test_organ_ellipsoid_mask_ring_and_lesion_measures():
    labels = np.zeros((20, 24, 24), np.uint8)
    labels[2:18, 3:21, 3:21] = 5
    labels[2:18, 3:21, 3:6] = 1  # a thin spleen stripe: not deep enough to be chosen
    mask, lab = bm.organ_ellipsoid_mask(labels, 1.0, [1, 5], radius_mm=3.0)
    organ = labels == 5
    assert lab == 5 and mask.any() and not (mask & ~organ).any()
    ring = bm.organ_ring(mask, organ, 1.0, 3.0)
    assert ring.any() and not (ring & mask).any() and not (ring & ~organ).any()
    near = bm.near_mask(mask, 1.0, 3.0)
    hu = np.where(organ, 60.0, 0.0).astype(np.float32)
    hu[mask] += 50.0
    m = bm.lesion_measures(hu, mask, ring, near)
    assert m["contrast_hu"] == pytest.approx(50.0) and m["threshold_dice"] == 1.0 and m["std_ring_hu"] == 0.0
    flat = bm.lesion_measures(np.where(organ, 60.0, 0.0), mask, ring, near)
    assert flat["contrast_hu"] == 0.0 and flat["threshold_dice"] == 0.0


def test_outside_identical_fraction():
    a = np.linspace(-1, 1, 64, dtype=np.float32).reshape(4, 4, 4)
    mask = np.zeros(a.shape, bool)
    mask[1, 1, 1] = True
    b = a.copy()
    b[1, 1, 1] = 99.0  # inside the mask: ignored
    assert bm.outside_identical_fraction(b, a, mask) == 1.0
    b[0, 0, 0] = np.nextafter(a[0, 0, 0], np.float32(2))  # one ulp outside the mask counts
    assert bm.outside_identical_fraction(b, a, mask) == pytest.approx(62 / 63)
    z = np.zeros(a.shape, np.float32)
    assert bm.outside_identical_fraction(-z, z, mask) < 1.0  # -0.0 and 0.0 differ in bits


def test_bm4d_is_optional(monkeypatch, tiny_model_dir):
    monkeypatch.setattr(bm, "bm4d_available", lambda: None)
    res = bm.run_benchmark(tiny_model_dir, options=_options(tasks=("denoise",), bm4d=True, nlm=False,
                                                            noise_levels_hu=(30.0,)))
    assert any("BM4D skipped" in n for n in res["notes"])
    assert not any(r["method"] == "BM4D" for r in res["rows"])
