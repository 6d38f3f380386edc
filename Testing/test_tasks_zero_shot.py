"""The zero-shot tasks (denoise, anomaly, synthesize) through ``run_task`` and the CLI.

A tiny random foundation model (1 mm) on a small phantom with an oblique, anisotropic grid
(spacing 2.0, 1.0, 1.2 mm), so every run goes through the resampling paths. The numbers the
model produces mean nothing; what is checked is the contract: outputs and their grids, seeds,
inputs left alone, untouched voxels, cancellation, progress and input validation.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedDiffFMLib import cli, io, preprocessing
from MedDiffFMLib.geometry import make_ijk_to_ras, regrid
from MedDiffFMLib.tasks import Cancelled, TaskRequest, run_task
from MedDiffFMLib.volume import Volume

from conftest import Recorder

pytestmark = pytest.mark.usefixtures("single_thread")

REGION = "abdomen"
TASKS = ("denoise", "anomaly", "synthesize")
# denoise runs DDPM steps here: its DDIM chain starts from the image itself and draws no noise
PARAMS = {"denoise": {"steps": 2, "method": "ddpm"}, "anomaly": {"steps": 2}, "synthesize": {"steps": 2}}
OUTPUTS = {  # task -> (volume names, segmentation names)
    "denoise": ({"denoised"}, set()),
    "anomaly": ({"anomaly_map", "reconstruction"}, {"anomaly"}),
    "synthesize": ({"synthetic"}, set()),
}
UNKNOWN_NAME = "unicorn_gland"
UNNAMED_LABEL = 249


# ----------------------------------------------------------------------------- helpers
def image_of(ph, writeable: bool = True) -> Volume:
    arr = np.array(ph.hu, dtype=np.float32, copy=True)
    arr.flags.writeable = writeable
    return Volume(arr, ph.ijk_to_ras.copy())


def anatomy_of(ph, writeable: bool = True) -> tuple[Volume, dict]:
    """The phantom's labels on a grid of their own (1.5 mm), with a block of a class the model does
    not know and a block of a label value without a name."""
    labels, m = preprocessing.resample(np.asarray(ph.labels, dtype=np.int32), ph.ijk_to_ras, (1.5, 1.5, 1.5), order=0)
    labels = np.array(labels, copy=True)
    c = [s // 2 for s in labels.shape]
    labels[c[0] - 3: c[0] + 3, c[1] - 4: c[1], c[2] - 3: c[2] + 3] = 250
    labels[c[0] - 3: c[0] + 3, c[1]: c[1] + 4, c[2] - 3: c[2] + 3] = UNNAMED_LABEL
    labels.flags.writeable = writeable
    names = {**ph.label_names, 250: UNKNOWN_NAME}
    return Volume(labels, m), names


def request_for(task, ph, params=None, writeable=True, anatomy=True, **kw) -> TaskRequest:
    anat, names = anatomy_of(ph, writeable) if anatomy else (None, None)
    return TaskRequest(image=image_of(ph, writeable), region=REGION, anatomy=anat, anatomy_names=names,
                       params={**PARAMS[task], **(params or {})}, **kw)


def raw_volume(array, m) -> Volume:
    """A Volume holding an array that Volume itself would refuse (as a caller may build one)."""
    v = Volume(np.zeros((1, 1, 1), np.float32), m)
    v.array = array
    return v


def expected_grid(task, request) -> Volume:
    """The grid the main output lies on: the input image's, or for synthesis the anatomy's."""
    if task == "synthesize" and request.anatomy is not None:
        return request.anatomy
    return request.image


@pytest.fixture(scope="module")
def runs(tiny_model_dir, task_phantom):
    """Per task, three runs: seed 0 (writeable inputs, progress recorded), seed 0 again (read-only
    inputs) and seed 1; with copies of the inputs taken before the first run."""
    cache: dict = {}

    def get(task):
        if task not in cache:
            first_req = request_for(task, task_phantom)
            copies = (first_req.image.array.copy(), first_req.anatomy.array.copy())
            rec = Recorder()
            first = run_task(task, first_req, tiny_model_dir, device="cpu", progress=rec)
            again_req = request_for(task, task_phantom, writeable=False)
            again = run_task(task, again_req, tiny_model_dir, device="cpu")
            other = run_task(task, request_for(task, task_phantom, {"seed": 1}), tiny_model_dir, device="cpu")
            cache[task] = dict(first=first, first_req=first_req, copies=copies, progress=rec.fractions,
                               again=again, again_req=again_req, other=other)
        return cache[task]

    return get


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("task", TASKS)
def test_output_names_shapes_and_geometry(runs, task):
    r = runs(task)
    res, req = r["first"], r["first_req"]
    vols, segs = OUTPUTS[task]
    assert set(res.volumes) == vols
    assert set(res.segmentations) == segs
    grid = expected_grid(task, req)
    for v in res.volumes.values():
        assert v.array.shape == grid.shape
        assert v.array.dtype == np.float32
        assert np.all(np.isfinite(v.array))
        assert np.array_equal(v.ijk_to_ras, grid.ijk_to_ras)
    for v in res.segmentations.values():
        assert v.array.shape == grid.shape
        assert v.array.dtype == bool
        assert np.array_equal(v.ijk_to_ras, grid.ijk_to_ras)
    assert all(np.isfinite(s) for s in res.scores.values())
    assert res.summary


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_identical_other_seed_differs(runs, task):
    r = runs(task)
    for name, v in r["first"].volumes.items():
        assert np.array_equal(v.array, r["again"].volumes[name].array), name
    for name, v in r["first"].segmentations.items():
        assert np.array_equal(v.array, r["again"].segmentations[name].array), name
    main = next(iter(OUTPUTS[task][0] - {"anomaly_map"}))
    assert not np.array_equal(r["first"].volumes[main].array, r["other"].volumes[main].array)


@pytest.mark.parametrize("task", TASKS)
def test_inputs_untouched_and_read_only_inputs_work(runs, task):
    r = runs(task)
    req, (image_copy, anatomy_copy) = r["first_req"], r["copies"]
    assert np.array_equal(req.image.array, image_copy)
    assert np.array_equal(req.anatomy.array, anatomy_copy)
    # the arrays are the caller's again: writeable as they were handed in
    assert req.image.array.flags.writeable and req.anatomy.array.flags.writeable
    # read-only inputs were accepted (the "again" run) and stay read-only
    assert not r["again_req"].image.array.flags.writeable
    assert not r["again_req"].anatomy.array.flags.writeable
    for v in list(r["first"].volumes.values()) + list(r["first"].segmentations.values()):
        assert not np.shares_memory(v.array, req.image.array)


@pytest.mark.parametrize("task", TASKS)
def test_unknown_anatomy_classes_are_reported(runs, task):
    messages = " ".join(runs(task)["first"].messages)
    assert UNKNOWN_NAME in messages
    assert f"label {UNNAMED_LABEL}" in messages


@pytest.mark.parametrize("task", TASKS)
def test_progress_increases_to_one(runs, task):
    f = runs(task)["progress"]
    assert len(f) >= 2
    assert all(0.0 <= x <= 1.0 for x in f)
    assert np.all(np.diff(f) > 0), f
    assert f[-1] == pytest.approx(1.0, abs=1e-12)


def test_denoise_keeps_voxels_outside_the_window(runs):
    r = runs("denoise")
    img = r["copies"][0]
    out = r["first"].volumes["denoised"].array
    keep = preprocessing.outside_window(img, REGION)
    assert keep.any() and (~keep).any()
    assert np.array_equal(out[keep], img[keep])
    assert not np.array_equal(out[~keep], img[~keep])
    assert r["first"].scores["noise_level_hu"] > 0


def test_anomaly_mask_follows_the_map(tiny_model_dir, task_phantom):
    """The mask is the map above the threshold (components below the minimum size dropped):
    a lower threshold flags a superset, and every flagged voxel is above the threshold."""
    masks = {}
    for threshold in (0.5, 2.0):
        # the random model's map, uncapped by the organ check, reaches both thresholds
        req = request_for("anomaly", task_phantom, {"threshold": threshold, "min_size_mm3": 0.0, "organ_check": False})
        res = run_task("anomaly", req, tiny_model_dir, device="cpu")
        amap, mask = res.volumes["anomaly_map"].array, res.segmentations["anomaly"].array
        assert np.all(amap >= 0) and mask.dtype == bool
        # no size filter: exactly the map above the threshold (the map is 0 outside the body)
        assert np.array_equal(mask, amap > threshold) and mask.any()
        assert res.scores["anomalous_volume_ml"] == pytest.approx(mask.sum() * np.prod(req.image.spacing_kji) / 1e3)
        masks[threshold] = mask
    assert masks[2.0].sum() < masks[0.5].sum()
    assert np.all(masks[0.5][masks[2.0]])


def test_anomaly_scores_a_nodule_in_a_lung_cut_by_the_field_of_view(tiny_model_dir):
    """A field of view inside the chest: the lung reaches every edge, so it is no hole of the
    body; the nodule in it is still scored, and voxels the window clips (the lung, in a
    soft-tissue window) are not."""
    from MedDiffFMLib.tasks import anomaly
    from MedDiffFMLib.tasks.common import Models
    from MedDiffFMLib.tasks.registry import TASKS

    rng = np.random.default_rng(0)
    hu = np.full((8, 24, 24), -850.0, np.float32)
    hu[:, :6] = 40.0  # chest wall along one side
    hu[3:6, 14:18, 10:14] = 30.0  # the nodule, well inside the lung
    hu += rng.normal(0, 12, hu.shape).astype(np.float32)
    image = Volume(hu, make_ijk_to_ras((2.0, 0.8, 0.8)))
    params = {k: spec.default for k, spec in TASKS["anomaly"].params.items()}
    models = Models.resolve(TASKS["anomaly"], tiny_model_dir)
    plan = anomaly.prepare(TaskRequest(image=image, region="chest"), params, models)
    nodule = np.zeros(hu.shape, bool)
    nodule[3:6, 14:18, 10:14] = True
    assert plan.body[nodule].all()
    assert not preprocessing.estimate_body_mask(hu)[nodule].any()  # the -500 HU rule would lose it
    # read in a soft-tissue window (an abdominal scan reaching the lung base), the lung is clipped
    res = run_task("anomaly", TaskRequest(image=image, region="abdomen", params={"steps": 1, "reconstructions": 1}),
                   tiny_model_dir, device="cpu")
    amap = res.volumes["anomaly_map"].array
    clipped = preprocessing.outside_window(hu, "abdomen")
    assert clipped.any() and np.all(amap[clipped] == 0) and amap[~clipped].max() > 0


def test_synthesize_grids_without_anatomy(tiny_model_dir, task_phantom):
    # the image gives the grid
    req = request_for("synthesize", task_phantom, anatomy=False)
    res = run_task("synthesize", req, tiny_model_dir, device="cpu")
    out = res.volumes["synthetic"]
    assert out.array.shape == req.image.shape
    assert np.array_equal(out.ijk_to_ras, req.image.ijk_to_ras)
    assert res.messages == []
    # neither: shape and spacing give it
    req = TaskRequest(region="chest", params={"steps": 1, "shape": (5, 6, 7), "spacing": (2.0, 1.5, 1.0)})
    out = run_task("synthesize", req, tiny_model_dir, device="cpu").volumes["synthetic"]
    assert out.array.shape == (5, 6, 7)
    np.testing.assert_allclose(out.spacing_kji, (2.0, 1.5, 1.0), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- cancel
@pytest.mark.parametrize("task", TASKS)
def test_cancel_stops_promptly(tiny_model_dir, task_phantom, network_calls, task):
    req = request_for(task, task_phantom, {"batch_size": 1, "steps": 3})
    image_copy = req.image.array.copy()
    rec = Recorder(cancel_after=1)
    with pytest.raises(Cancelled):
        run_task(task, req, tiny_model_dir, device="cpu", progress=rec, cancel=rec.cancel)
    assert len(rec.fractions) == 1
    assert 1 <= len(network_calls) <= 2  # a full run makes at least 3 steps x 2 windows
    assert np.array_equal(req.image.array, image_copy)
    assert req.image.array.flags.writeable


def test_cancel_accepts_a_threading_event(tiny_model_dir, task_phantom, network_calls):
    import threading

    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        run_task("denoise", request_for("denoise", task_phantom), tiny_model_dir, device="cpu", cancel=stop)
    assert network_calls == []


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def ct_file(tmp_path, task_phantom):
    path = tmp_path / "in" / "ct.nii.gz"
    path.parent.mkdir()
    io.write_volume(path, task_phantom.volume())
    return path


def _cli(task, ct_file, out, model, *extra):
    return cli.main([task, str(ct_file), "-o", str(out), "--model", str(model), "--device", "cpu", "--quiet",
                     "--region", REGION, "--steps", "2", *extra])


def test_cli_denoise_writes_its_output(tmp_path, ct_file, tiny_model_dir, capsys):
    out = tmp_path / "in" / "den.nii.gz"
    assert _cli("denoise", ct_file, out, tiny_model_dir) == 0
    vol = io.read_volume(out)
    assert vol.shape == (8, 16, 14)
    np.testing.assert_allclose(vol.ijk_to_ras, io.read_volume(ct_file).ijk_to_ras, atol=1e-4)
    assert "denoise:" in capsys.readouterr().out


@pytest.mark.parametrize("task,exc", [("denoise", None), ("anomaly", KeyboardInterrupt),
                                      ("denoise", KeyboardInterrupt), ("anomaly", None)])
def test_cli_interrupted_run_writes_nothing(interrupt_run_task, tmp_path, ct_file, tiny_model_dir, capsys, task, exc):
    seen = interrupt_run_task(exc)
    before = sorted(p.name for p in ct_file.parent.iterdir())
    out = ct_file.parent / f"result_{task}.nii.gz"
    assert _cli(task, ct_file, out, tiny_model_dir) == 130
    assert len(seen) == 1
    assert not out.exists()
    assert sorted(p.name for p in ct_file.parent.iterdir()) == before  # no outputs, no temp files
    assert "nothing written" in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input
def _expect_value_error(task, request, model, match):
    with pytest.raises(ValueError, match=match):
        run_task(task, request, model, device="cpu")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("shape", [(16, 14), (2, 8, 16, 14)])
def test_rejects_non_3d_images(tiny_model_dir, task_phantom, task, shape):
    with pytest.raises(ValueError, match="3-D"):
        Volume(np.zeros(shape, np.float32), task_phantom.ijk_to_ras)
    req = request_for(task, task_phantom, anatomy=False)
    req.image = raw_volume(np.zeros(shape, np.float32), task_phantom.ijk_to_ras)
    _expect_value_error(task, req, tiny_model_dir, "3-D")


@pytest.mark.parametrize("task", TASKS)
def test_rejects_nan(tiny_model_dir, task_phantom, task):
    req = request_for(task, task_phantom, anatomy=False)
    req.image.array[3, 4, 5] = np.nan
    _expect_value_error(task, req, tiny_model_dir, "NaN")


@pytest.mark.parametrize("task", TASKS)
def test_rejects_unknown_region(tiny_model_dir, task_phantom, task):
    req = request_for(task, task_phantom, anatomy=False)
    req.region = "pelvis"
    _expect_value_error(task, req, tiny_model_dir, "unknown region 'pelvis'")


@pytest.mark.parametrize("task", TASKS)
def test_rejects_unknown_parameter(tiny_model_dir, task_phantom, task):
    req = request_for(task, task_phantom, {"stepz": 3}, anatomy=False)
    _expect_value_error(task, req, tiny_model_dir, r"unknown parameter\(s\) \['stepz'\]")


@pytest.mark.parametrize("task,params,match", [
    ("denoise", {"strength": 0}, "strength"),
    ("denoise", {"method": "euler"}, "method"),
    ("anomaly", {"noise_fraction": 1.5}, "noise_fraction"),
    ("anomaly", {"reconstructions": 0}, "reconstructions"),
    ("synthesize", {"steps": "many"}, "steps"),
])
def test_rejects_bad_parameter_values(tiny_model_dir, task_phantom, task, params, match):
    _expect_value_error(task, request_for(task, task_phantom, params, anatomy=False), tiny_model_dir, match)


def test_synthesize_needs_a_region_without_image(tiny_model_dir):
    req = TaskRequest(region=None, params={"steps": 1, "shape": (4, 4, 4)})
    _expect_value_error("synthesize", req, tiny_model_dir, "region")


def test_rejects_unknown_task(tiny_model_dir, task_phantom):
    _expect_value_error("sharpen", request_for("denoise", task_phantom), tiny_model_dir, "unknown task")


def test_the_phantom_grid_is_oblique_and_anisotropic(task_phantom):
    """So that every task above resamples to and from the model's 1 mm grid."""
    m = task_phantom.ijk_to_ras
    d = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    assert not np.allclose(np.abs(d), np.eye(3), atol=1e-3)
    assert np.any(m[:3, 3] != 0)
    _, shape = regrid(m, (8, 16, 14), (1.0, 1.0, 1.0))
    assert shape == (16, 16, 17)
    assert not np.allclose(m, make_ijk_to_ras((2.0, 1.0, 1.2)))


def test_group_zscore_normalises_each_tissue_on_its_own():
    from MedDiffFMLib.tasks.anomaly import group_zscore

    rng = np.random.default_rng(0)
    groups = np.zeros((8, 8, 16), np.int8)
    groups[:, :, :8] = 1
    groups[:, :, 8:] = 2
    # tissue 2 is ten times noisier than tissue 1; an outlier of the same size sits in each
    diff = np.where(groups == 1, 0.01, 0.1) * np.abs(rng.standard_normal(groups.shape)) + 0.1
    diff[4, 4, 3] += 0.2
    diff[4, 4, 12] += 0.2
    z = group_zscore(diff.astype(np.float32), groups, np.ones(groups.shape, bool))
    assert z.min() == 0.0
    # in the quiet tissue the outlier stands out; in the noisy one it is ordinary
    assert z[4, 4, 3] > 10 and z[4, 4, 12] < z[4, 4, 3] / 4
    assert np.median(z[groups == 1]) == pytest.approx(0.0, abs=0.01)  # half the tissue sits at or below its median


def test_anomaly_organ_check_caps_the_map_by_the_organ_deviation(tiny_model_dir, task_phantom):
    """With labels, the map is the model's z-map capped by the z-map of each voxel's deviation from
    its label's median (same seed: the minimum of the uncapped map and that one); without, no change."""
    from MedDiffFMLib.tasks import anomaly, check_params
    from MedDiffFMLib.tasks.common import Models
    from MedDiffFMLib.tasks.registry import TASKS

    maps = {}
    for labels in (True, False):
        for check in (True, False):
            req = request_for("anomaly", task_phantom, {"organ_check": check}, anatomy=labels)
            maps[labels, check] = run_task("anomaly", req, tiny_model_dir, device="cpu").volumes["anomaly_map"].array
    params = check_params("anomaly", request_for("anomaly", task_phantom).params)
    plan = anomaly.prepare(request_for("anomaly", task_phantom), params, Models.resolve(TASKS["anomaly"], tiny_model_dir))
    scored = plan.body & ~preprocessing.outside_window(plan.image.array, plan.region)
    deviation = anomaly.organ_deviation(plan.unit, plan.labels, plan.body, params["smoothing_mm"],
                                        plan.image.spacing_kji)
    organ_z = anomaly.group_zscore(deviation, plan.groups, scored)
    np.testing.assert_allclose(maps[True, True], np.minimum(maps[True, False], organ_z), atol=1e-5)
    assert (maps[True, True] < maps[True, False] - 0.1).any() and (maps[True, True] > 0).any()
    np.testing.assert_array_equal(maps[False, True], maps[False, False])
