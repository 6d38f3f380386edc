"""The benchmark: end to end with a tiny random model on tiny clinical-grid cases, its case
grids, and each baseline against a case worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from MedDiffFMLib import benchmark as bm
from MedDiffFMLib import metrics, preprocessing
from MedDiffFMLib.benchmark import baselines
from MedDiffFMLib.benchmark.cases import case_seed, clinical_grid, make_case, superres_grid
from MedDiffFMLib.benchmark.options import INPLANE_MM, SLICE_MM

TINY_FOV = (10.0, 20.0, 20.0)  # mm: a few thousand voxels at clinical spacing


def _options(**kw):
    base = dict(cases=1, families=("heldout", "training"), fov_mm=TINY_FOV, noise_levels_hu=(25.0,),
                superres_factors=(3,), steps={s: 1 for s in bm.SECTIONS}, device="cpu", bm4d=False, progress=False)
    base.update(kw)
    return bm.BenchmarkOptions(**base)


@pytest.fixture(scope="module")
def result(tiny_model_dir, tiny_controlnet_dirs):
    torch.set_num_threads(1)
    return bm.run_benchmark(tiny_model_dir, superres_controlnet=tiny_controlnet_dirs["superres"],
                            lesion_controlnet=tiny_controlnet_dirs["lesion"], options=_options())


# ------------------------------------------------------------------------------- end to end
METHODS = {
    "denoise": ("noisy input", "Gaussian (tuned sigma)", "non-local means, true sigma",
                "non-local means, estimated sigma", "model (DiffPIR)"),
    "anomaly": ("model, with anatomy labels", "model, no labels", "organ-median deviation (labels)",
                "model, labels, no organ check"),
    "superres": ("model (ControlNet)", "linear interpolation", "cubic interpolation", "parabolic slabs (PPM)",
                 "total-variation slabs"),
}


@pytest.mark.parametrize("family", ["heldout", "training"])
def test_every_section_reports_the_model_beside_its_baselines(result, family):
    rows = [r for r in result["rows"] if r["family"] == family]
    for section, methods in METHODS.items():
        present = {r["method"] for r in rows if r["section"] == section}
        assert set(methods) <= present, (section, present)
    cond = "25 HU noise"
    for method in METHODS["denoise"]:
        for metric in ("psnr_db", "ssim", "edge_ratio"):
            row = bm.find_row(result, family, "denoise", cond, method, metric)
            assert row is not None and math.isfinite(row["mean"]), (method, metric)
    for method in ("Gaussian (tuned sigma)", "non-local means, estimated sigma", "model (DiffPIR)"):
        assert bm.find_row(result, family, "denoise", "noise-free input", method, "rms_change_hu") is not None
    for method in METHODS["anomaly"]:
        for cond, metric in (("lesion cases", "voxel_auroc"), ("healthy cases", "flagged_ml"),
                             ("all volumes", "volume_auroc")):
            row = bm.find_row(result, family, "anomaly", cond, method, metric)
            assert row is not None and row["values"][0] is not None, (method, metric)
    sr_cond = next(r["condition"] for r in rows if r["section"] == "superres")
    for method in METHODS["superres"]:
        for metric in ("psnr_db", "slab_max_error_hu", "edge_ratio"):
            assert math.isfinite(bm.find_row(result, family, "superres", sr_cond, method, metric)["mean"])
    for method in ("real phantom (ceiling)", "model", bm.options.UNPHASED_SYNTHESIS):
        assert bm.find_row(result, family, "synthesis", "all groups (mean)", method, "threshold_dice"), method
    for section, cond, method in (("inpaint", "healthy content", "model (RePaint + lesion ControlNet)"),
                                  ("lesion", "generated in the mask", "model (lesion ControlNet)")):
        assert bm.find_row(result, family, section, cond, method, "outside_identical")["values"] == [1.0]


@pytest.mark.parametrize("family", ["heldout", "training"])
def test_synthesis_runs_every_region_as_often_as_the_other_sections_run_cases(result, family):
    """Its targets are per organ group, and each group lives in one region."""
    row = bm.find_row(result, family, "synthesis", "all groups (mean)", "model", "threshold_dice")
    assert row["n"] == 3 and sorted(c.split()[1] for c in row["cases"]) == sorted(bm.options.REGIONS)
    assert result["meta"]["synthesis_regions"] == list(bm.options.REGIONS)
    assert bm.find_row(result, family, "denoise", "25 HU noise", "model (DiffPIR)", "psnr_db")["n"] == 1


def test_synthesis_samples_a_case_in_the_default_phase_once(tiny_model_dir, monkeypatch):
    """'model' (told the case's phase) and 'model, phase not given' are the same request when the
    case is in the task's default phase: one sampling, the same rows."""
    import MedDiffFMLib.tasks as tasks
    from MedDiffFMLib.tasks.registry import TASKS

    calls = []  # the params of every task run
    run_task = tasks.run_task
    monkeypatch.setattr(tasks, "run_task", lambda *a, **kw: calls.append(a[1].params) or run_task(*a, **kw))
    torch.set_num_threads(1)
    result = bm.run_benchmark(tiny_model_dir, options=_options(sections=("synthesis",), families=("heldout",)))
    default = TASKS["synthesize"].params["contrast_phase"].default
    cases = []
    for i, region in enumerate(bm.options.REGIONS):
        seed = case_seed(bm.options.SEED_START, i)
        cases.append(make_case("heldout", region, seed, clinical_grid(region, seed, TINY_FOV)))
    in_default = [c.phase == default for c in cases]
    assert any(in_default) and not all(in_default)  # both kinds of case are exercised
    assert len(calls) == sum(1 if d else 2 for d in in_default)
    told, unphased = (bm.find_row(result, "heldout", "synthesis", "all groups (mean)", method, "threshold_dice")
                      for method in ("model", bm.options.UNPHASED_SYNTHESIS))
    assert told["cases"] == unphased["cases"] == [c.name for c in cases]
    for c, d, a, b in zip(cases, in_default, told["values"], unphased["values"]):
        if d:
            assert a == b, c.name


def test_numbers_match_an_independent_computation(result):
    """The noisy input's PSNR and the linear interpolation's slab error, recomputed from the case."""
    case = make_case("heldout", "head_neck", bm.options.SEED_START,
                     clinical_grid("head_neck", bm.options.SEED_START, TINY_FOV))
    lo, hi = preprocessing.window_bounds("head_neck")
    noisy = case.noisy(25.0, case.seed + 2)
    err = (np.clip(noisy.astype(np.float64), lo, hi) - np.clip(case.clean_hu.astype(np.float64), lo, hi))[case.body]
    expected = 10 * np.log10((hi - lo) ** 2 / np.mean(err ** 2))
    row = bm.find_row(result, "heldout", "denoise", "25 HU noise", "noisy input", "psnr_db")
    assert row["values"][0] == pytest.approx(expected, rel=1e-6) and row["cases"] == [case.name]
    # interpolating slab means does not give back the slab means of curved content: measured, not assumed
    sr = [r for r in result["rows"] if r["family"] == "heldout" and r["section"] == "superres"
          and r["metric"] == "slab_max_error_hu"]
    by_method = {r["method"]: r["mean"] for r in sr}
    assert len(sr) == 5
    assert by_method["linear interpolation"] > 0 and by_method["cubic interpolation"] > 0
    assert all(by_method[m] < 1e-3 for m in ("parabolic slabs (PPM)", "total-variation slabs", "model (ControlNet)"))


def test_tables_markdown_and_json(result, tmp_path):
    text = bm.format_table(result)
    assert "== Denoising (held-out family) ==" in text and "== Denoising (training family) ==" in text
    assert text.count("Noise-free phantom") == 1  # each caption once
    md = bm.format_markdown(result)
    assert md.startswith("# MedDiffFM benchmark") and md.count("| condition | method |") == 12
    back = json.loads(bm.write_json(result, tmp_path / "r.json").read_text(encoding="utf-8"))
    assert len(back["rows"]) == len(result["rows"])


def test_cli_quick_writes_json_and_markdown(tiny_model_dir, tmp_path, capsys):
    from MedDiffFMLib.cli import main
    from MedDiffFMLib.weights import sha256_file

    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = main(["benchmark", "--quick", "--model", str(tiny_model_dir), "--sections", "denoise", "--no-nlm",
               "--device", "cpu", "--quiet", "-o", str(out), "--markdown", str(md)])
    assert rc == 0
    assert "== Denoising (held-out family) ==" in capsys.readouterr().out
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["meta"]["steps"] == {"denoise": 1} and data["meta"]["families"] == ["heldout"]
    # the weights measured are named by their checksum, so runs from two copies of them merge
    assert data["meta"]["model_sha256"] == sha256_file(tiny_model_dir / "model.safetensors")
    assert {r["method"] for r in data["rows"]} == {"noisy input", "Gaussian (tuned sigma)", "model (DiffPIR)"}
    assert md.read_text(encoding="utf-8").startswith("# MedDiffFM benchmark")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]  # no temporary files left


def test_controlnet_sections_skipped_with_a_note(tiny_model_dir, monkeypatch):
    from MedDiffFMLib import weights

    monkeypatch.setattr(weights, "default_model_id", lambda kind="base", task=None: None)
    res = bm.run_benchmark(tiny_model_dir, options=_options(sections=("superres", "inpaint", "lesion"),
                                                            families=("heldout",)))
    assert res["rows"] == []
    assert any("super-resolution skipped" in n for n in res["notes"])
    assert any("inpainting and lesion generation skipped" in n for n in res["notes"])
    with pytest.raises(ValueError, match="superres ControlNet"):
        bm.run_benchmark(tiny_model_dir, superres_controlnet=str(tiny_model_dir.parent / "missing"),
                         options=_options(sections=("superres",)))


def test_options_are_checked():
    assert bm.parse_steps(["7"]) == {s: 7 for s in bm.SECTIONS}
    assert bm.parse_steps(["denoise=3", "synthesize=4"]) == {"denoise": 3, "synthesis": 4}
    assert bm.parse_sections("lesion,denoise") == ["denoise", "lesion"]
    for bad in (dict(sections="segment"), dict(seed_start=5000), dict(superres_factors=(7,)), dict(families="x"),
                dict(cases=0)):
        with pytest.raises(ValueError):
            bm.BenchmarkOptions(**bad)


# ------------------------------------------------------------------------------- case grids
@pytest.mark.parametrize("seed", [200_000, 200_010, 200_020, 200_030])
def test_case_grids_are_clinical_and_oblique(seed):
    m, shape = clinical_grid("chest", seed, (48.0, 128.0, 128.0))
    spacing = np.linalg.norm(m[:3, :3], axis=0)[::-1]
    assert SLICE_MM[0] <= spacing[0] <= SLICE_MM[1] and INPLANE_MM[0] <= spacing[1] == pytest.approx(spacing[2])
    assert spacing[1] <= INPLANE_MM[1]
    direction = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    tilt = np.degrees(np.arccos(np.clip(np.abs(direction[2, 2]), 0, 1)))  # k against the body axis
    off_axis = np.abs(direction) - np.round(np.abs(direction))
    assert np.abs(off_axis).max() > np.sin(np.radians(2.0)) and tilt < 16.0  # never axis-aligned
    thin, thin_shape = superres_grid("chest", seed, (48.0, 128.0, 128.0), 5)
    assert thin_shape[0] % 5 == 0 and 0.8 <= np.linalg.norm(thin[:3, 2]) <= 1.0


# ------------------------------------------------------------------------------- baselines
def test_gaussian_in_mm_keeps_clipped_voxels_and_tuning_picks_the_right_end():
    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 0.8)
    clean = np.full((12, 16, 16), 40.0, np.float32)
    clean[:, :, :2] = 900.0  # bone, outside the abdomen window
    noisy = (clean + 20 * rng.standard_normal(clean.shape)).astype(np.float32)
    out = baselines.gaussian_denoise(noisy, "abdomen", 1.0, spacing)
    outside = preprocessing.outside_window(noisy, "abdomen")
    assert np.array_equal(out[outside], noisy[outside])
    flat = np.zeros(clean.shape, bool)
    flat[2:-2, 2:-2, 4:-2] = True
    assert out[flat].std() < 0.5 * noisy[flat].std()
    plain = np.full(clean.shape, 40.0, np.float32)
    plain_noisy = (plain + 20 * rng.standard_normal(clean.shape)).astype(np.float32)
    sigmas = bm.options.GAUSSIAN_SIGMAS_MM
    assert baselines.tune_gaussian_sigma(plain_noisy, plain, "abdomen", spacing, flat)[0] == max(sigmas)
    checker = (np.indices(clean.shape).sum(0) % 2 * 200 - 50).astype(np.float32)
    assert baselines.tune_gaussian_sigma(checker + 0.1, checker, "abdomen", spacing, flat)[0] == min(sigmas)


def test_blind_noise_estimate_and_nlm():
    pytest.importorskip("skimage")
    rng = np.random.default_rng(1)
    clean = np.full((12, 24, 24), 50.0, np.float32)
    clean[:, 12:] = 120.0
    noisy = (clean + 15 * rng.standard_normal(clean.shape)).astype(np.float32)
    assert baselines.estimate_noise_sigma(noisy) == pytest.approx(15.0, rel=0.1)  # white noise: unbiased
    assert baselines.estimate_noise_sigma(clean) == 0.0  # a step edge leaves the finest band empty
    out = baselines.nlm_denoise(noisy, "abdomen", 15.0)
    assert np.abs(out - clean).mean() < 0.6 * np.abs(noisy - clean).mean()


def test_interpolation_is_exact_on_a_linear_ramp():
    from MedDiffFMLib.geometry import make_ijk_to_ras, regrid

    thin_m = make_ijk_to_ras((1.0, 0.7, 0.7), (3.0, -2.0, 5.0))
    k = np.arange(12, dtype=np.float32)
    thin = np.broadcast_to((10.0 * k)[:, None, None], (12, 4, 4)).astype(np.float32)
    thick = metrics.slab_means(thin, 3).astype(np.float32)
    thick_m, _ = regrid(thin_m, thin.shape, (3.0, 0.7, 0.7))
    linear = baselines.interpolate(thick, thick_m, thin.shape, thin_m, 1)
    # inside the outermost thick slice centres the ramp is reproduced exactly
    np.testing.assert_allclose(linear[1:-1], thin[1:-1], atol=1e-4)


def test_organ_deviation_map_finds_a_lesion_and_the_volume_score_ranks_it():
    from MedDiffFMLib.tasks import anomaly

    labels = np.zeros((16, 16, 16), np.uint8)
    labels[2:14, 2:14, 2:14] = 5  # liver
    hu = np.where(labels > 0, 60.0, -1000.0) + 3.0 * np.random.default_rng(2).standard_normal(labels.shape)
    hu = hu.astype(np.float32)
    healthy = hu.copy()
    hu[7:10, 7:10, 7:10] -= 50.0
    body = labels > 0
    amap = baselines.zscore_by_tissue(baselines.organ_deviation_map(hu, labels, "abdomen", 1.0, (1, 1, 1)),
                                      labels, {5: "liver"})
    assert amap[~body].max() == 0.0 and np.unravel_index(np.argmax(amap), amap.shape) == (8, 8, 8)
    truth = np.zeros_like(body)
    truth[7:10, 7:10, 7:10] = True
    mask = anomaly.anomaly_mask(amap, body, threshold=4.0, min_voxels=3)
    assert (mask & truth).sum() == truth.sum() and metrics.dice(mask, truth) > 0.3
    clean_map = baselines.zscore_by_tissue(baselines.organ_deviation_map(healthy, labels, "abdomen", 1.0, (1, 1, 1)),
                                           labels, {5: "liver"})
    assert anomaly.volume_score(amap, body, (1, 1, 1)) > anomaly.volume_score(clean_map, body, (1, 1, 1))
    # a component smaller than the smallest size kept is dropped
    from scipy import ndimage

    largest = int(np.bincount(ndimage.label(mask)[0].ravel())[1:].max())
    assert anomaly.anomaly_mask(amap, body, threshold=4.0, min_voxels=largest).any()
    assert not anomaly.anomaly_mask(amap, body, threshold=4.0, min_voxels=largest + 1).any()


def test_nearest_mean_segmentation_and_groups():
    groups = np.zeros((6, 6, 6), np.int8)
    groups[1:5, 1:5, 1:5] = 1
    groups[2:4, 2:4, 2:4] = 7
    hu = np.where(groups == 7, 60.0, np.where(groups == 1, -100.0, -1000.0)).astype(np.float32)
    body = groups > 0
    means = baselines.class_means(hu, groups, body, "abdomen", [1, 7])
    assert means == {1: -100.0, 7: 60.0}
    assert np.array_equal(baselines.nearest_mean_segmentation(hu + 10.0, means, body, "abdomen"), groups)
    assert baselines.main_groups(groups, body) == [1]  # the 8-voxel group is under 10 voxels
    assert baselines.group_name(7) == "liver" and baselines.group_name(1) == "body tissue"


def test_organ_ellipsoid_mask_is_in_millimetres_on_anisotropic_grids():
    labels = np.zeros((20, 40, 40), np.uint8)
    labels[2:18, 3:37, 3:37] = 5
    spacing = (2.0, 0.5, 0.5)
    mask, label = baselines.organ_ellipsoid_mask(labels, spacing, [1, 5], radius_mm=4.0, semi_scale=(1, 1, 1))
    assert label == 5 and not (mask & (labels != 5)).any()
    extent_mm = [(np.ptp(np.nonzero(mask)[a]) + 1) * s for a, s in enumerate(spacing)]
    assert extent_mm == pytest.approx([10.0, 8.5, 8.5], abs=1.1)  # 8 mm across, one voxel of rounding
    ring = baselines.organ_ring(mask, labels == 5, spacing, 3.0)
    assert ring.any() and not (ring & mask).any()
