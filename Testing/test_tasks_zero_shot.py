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
from MedDiffFMLib.tasks import Cancelled, run_task
from MedDiffFMLib.volume import Volume

from conftest import Recorder
from task_requests import REGION, UNKNOWN_NAME, UNNAMED_LABEL, request_for

pytestmark = pytest.mark.usefixtures("single_thread")

TASKS = ("denoise", "anomaly", "synthesize")
OUTPUTS = {  # task -> (volume names, segmentation names)
    "denoise": ({"denoised"}, set()),
    "anomaly": ({"anomaly_map", "reconstruction"}, {"anomaly"}),
    "synthesize": ({"synthetic"}, set()),
}


# ----------------------------------------------------------------------------- helpers
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
