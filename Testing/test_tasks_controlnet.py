"""The ControlNet tasks (superres, lesion, inpaint) through ``run_task`` and the CLI, and the
RePaint schedule.

Tiny random base (1 mm) and tiny ControlNets (conftest ``tiny_controlnet_dirs``), small
phantoms on oblique, anisotropic grids. Checked: outputs and their grids (super-resolution:
the exact new grid), seeds, inputs left alone, voxels outside the mask bit for bit,
super-resolution consistency, cancellation, progress and input validation.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedDiffFMLib import cli, io, preprocessing
from MedDiffFMLib.geometry import make_ijk_to_ras, voxel_to_ras
from MedDiffFMLib.phantoms import make_phantom
from MedDiffFMLib.tasks import Cancelled, TaskRequest, run_task
from MedDiffFMLib.sampling import repaint_schedule
from MedDiffFMLib.volume import Volume

from conftest import Recorder

pytestmark = pytest.mark.usefixtures("single_thread")

REGION = "abdomen"
TASKS = ("superres", "lesion", "inpaint")
CN = {"superres": "superres", "lesion": "lesion", "inpaint": "lesion"}
PARAMS = {"superres": {"steps": 2}, "lesion": {"steps": 2},
          "inpaint": {"steps": 3, "jump_length": 1, "jump_n_sample": 2}}
OUTPUTS = {"superres": ({"superres"}, set()), "lesion": ({"lesion"}, {"lesion"}),
           "inpaint": ({"inpainted"}, {"inpainted_region"})}
MASKED = ("lesion", "inpaint")
UNKNOWN_NAME = "unicorn_gland"


# ----------------------------------------------------------------------------- helpers
def centre_ras(m, shape) -> np.ndarray:
    return voxel_to_ras(m, np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2]))[0]


def ball_mask(m, shape, centre, radius_mm) -> np.ndarray:
    """Voxels of the grid (m, shape) whose centre lies within ``radius_mm`` of ``centre`` (RAS)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ras = voxel_to_ras(m, np.stack([i.ravel(), j.ravel(), k.ravel()], 1))
    return (np.linalg.norm(ras - centre, axis=1) <= radius_mm).reshape(shape)


def mask_of(ph, writeable=True) -> Volume:
    mask = ball_mask(ph.ijk_to_ras, ph.hu.shape, centre_ras(ph.ijk_to_ras, ph.hu.shape), 4.0)
    mask.flags.writeable = writeable
    return Volume(mask, ph.ijk_to_ras.copy())


def anatomy_of(ph, writeable=True) -> tuple[Volume, dict]:
    labels = np.array(ph.labels, dtype=np.int32)
    labels[2:5, 3:8, 3:8] = 250
    labels.flags.writeable = writeable
    return Volume(labels, ph.ijk_to_ras.copy()), {**ph.label_names, 250: UNKNOWN_NAME}


def request_for(task, ph, params=None, writeable=True, mask=True, anatomy=True) -> TaskRequest:
    img = np.array(ph.hu, dtype=np.float32)
    img.flags.writeable = writeable
    anat, names = anatomy_of(ph, writeable) if anatomy else (None, None)
    return TaskRequest(image=Volume(img, ph.ijk_to_ras.copy()), region=REGION, anatomy=anat, anatomy_names=names,
                       mask=mask_of(ph, writeable) if (mask and task in MASKED) else None,
                       params={**PARAMS[task], **(params or {})})


def run(task, request, model, cns, **kw):
    return run_task(task, request, model, controlnet=cns[CN[task]], device="cpu", **kw)


def raw_volume(array, m) -> Volume:
    v = Volume(np.zeros((1, 1, 1), np.float32), m)
    v.array = array
    return v


def first_corner(m) -> np.ndarray:
    return voxel_to_ras(m, np.array([-0.5, -0.5, -0.5]))[0]


def oblique(spacing_kji, origin=(-7.5, 30.0, -12.25)) -> np.ndarray:
    """A grid with the given spacing, a non-zero origin and an oblique direction (a rotation by
    0.7 rad about (1, 3, -2))."""
    a = np.array([1.0, 3.0, -2.0]) / np.sqrt(14.0)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    rot = np.eye(3) + np.sin(0.7) * k + (1.0 - np.cos(0.7)) * (k @ k)
    return make_ijk_to_ras(spacing_kji, origin, rot)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_controlnet_dirs, task_phantom):
    """Per task: seed 0 (writeable inputs, progress recorded), seed 0 again (read-only inputs), seed 1."""
    cache: dict = {}

    def get(task):
        if task not in cache:
            req = request_for(task, task_phantom)
            copies = {k: getattr(req, k).array.copy() for k in ("image", "anatomy", "mask") if getattr(req, k)}
            rec = Recorder()
            first = run(task, req, tiny_model_dir, tiny_controlnet_dirs, progress=rec)
            again_req = request_for(task, task_phantom, writeable=False)
            again = run(task, again_req, tiny_model_dir, tiny_controlnet_dirs)
            other = run(task, request_for(task, task_phantom, {"seed": 1}), tiny_model_dir, tiny_controlnet_dirs)
            cache[task] = dict(first=first, req=req, copies=copies, progress=rec.fractions, again=again,
                               again_req=again_req, other=other)
        return cache[task]

    return get


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("task", TASKS)
def test_output_names_and_shapes(runs, task):
    r = runs(task)
    res, req = r["first"], r["req"]
    vols, segs = OUTPUTS[task]
    assert set(res.volumes) == vols and set(res.segmentations) == segs
    expect_shape = (16, 16, 14) if task == "superres" else req.image.shape
    for v in res.volumes.values():
        assert v.array.shape == expect_shape
        assert v.array.dtype == np.float32 and np.all(np.isfinite(v.array))
    for v in res.segmentations.values():
        assert v.array.dtype == bool and v.array.shape == req.image.shape
    assert all(np.isfinite(s) for s in res.scores.values())


@pytest.mark.parametrize("task", MASKED)
def test_masked_tasks_keep_the_input_grid(runs, task):
    r = runs(task)
    for v in list(r["first"].volumes.values()) + list(r["first"].segmentations.values()):
        assert np.array_equal(v.ijk_to_ras, r["req"].image.ijk_to_ras)


def test_superres_grid_on_the_phantom(runs):
    """Factor 2 (auto: 2 mm slices over 1.1 mm in-plane): spacing (1, 1, 1.2), first corner fixed."""
    r = runs("superres")
    out, img = r["first"].volumes["superres"], r["req"].image
    np.testing.assert_allclose(out.spacing_kji, img.spacing_kji / [2, 1, 1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(first_corner(out.ijk_to_ras), first_corner(img.ijk_to_ras), atol=1e-6)
    np.testing.assert_allclose(out.ijk_to_ras[:3, :3] / out.spacing_kji[::-1],
                               img.ijk_to_ras[:3, :3] / img.spacing_kji[::-1], atol=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_identical_other_seed_differs(runs, task):
    r = runs(task)
    for kind in ("volumes", "segmentations"):
        for name, v in getattr(r["first"], kind).items():
            assert np.array_equal(v.array, getattr(r["again"], kind)[name].array), name
    main = next(iter(OUTPUTS[task][0]))
    assert not np.array_equal(r["first"].volumes[main].array, r["other"].volumes[main].array)


@pytest.mark.parametrize("task", TASKS)
def test_inputs_untouched_and_read_only_inputs_work(runs, task):
    r = runs(task)
    for k, copy in r["copies"].items():
        arr = getattr(r["req"], k).array
        assert np.array_equal(arr, copy), k
        assert arr.flags.writeable, k
        assert not getattr(r["again_req"], k).array.flags.writeable, k
    for v in list(r["first"].volumes.values()) + list(r["first"].segmentations.values()):
        assert not np.shares_memory(v.array, r["req"].image.array)
        if r["req"].mask is not None:
            assert not np.shares_memory(v.array, r["req"].mask.array)


@pytest.mark.parametrize("task", MASKED)
def test_voxels_outside_the_mask_are_bit_identical(runs, task):
    r = runs(task)
    img, m = r["copies"]["image"], r["copies"]["mask"]
    out = r["first"].volumes[next(iter(OUTPUTS[task][0]))].array
    seg = r["first"].segmentations[next(iter(OUTPUTS[task][1]))].array
    assert np.array_equal(seg, m)
    assert 0 < m.sum() < m.size
    assert np.array_equal(out[~m], img[~m])
    assert not np.array_equal(out[m], img[m])


@pytest.mark.parametrize("task", TASKS)
def test_unknown_anatomy_classes_are_reported(runs, task):
    assert UNKNOWN_NAME in " ".join(runs(task)["first"].messages)


@pytest.mark.parametrize("task", TASKS)
def test_progress_increases_to_one(runs, task):
    f = runs(task)["progress"]
    assert len(f) >= 2 and all(0.0 <= x <= 1.0 for x in f)
    assert np.all(np.diff(f) > 0), f
    assert f[-1] == pytest.approx(1.0, abs=1e-12)


def test_inpaint_runs_the_repaint_schedule(runs, network_calls, tiny_model_dir, tiny_controlnet_dirs, task_phantom):
    p = PARAMS["inpaint"]
    seq = repaint_schedule(p["steps"], p["jump_length"], p["jump_n_sample"])
    n_down = sum(b < a for a, b in zip(seq, seq[1:]))
    assert n_down > p["steps"]  # resampling took place
    assert runs("inpaint")["first"].scores["network_steps"] == n_down
    run("inpaint", request_for("inpaint", task_phantom, {"batch_size": 8}), tiny_model_dir, tiny_controlnet_dirs)
    assert len(network_calls) == n_down  # one batch holds all windows of a step


def test_lesion_mask_on_another_grid(tiny_model_dir, tiny_controlnet_dirs, task_phantom):
    """A mask drawn on its own (1 mm, axis-aligned) grid is resampled to the image grid; outside
    that resampled mask (the returned segmentation) the image is kept bit for bit."""
    ph = task_phantom
    m = make_ijk_to_ras((1.0, 1.0, 1.0), centre_ras(ph.ijk_to_ras, ph.hu.shape) - 10.0)
    mask = ball_mask(m, (21, 21, 21), centre_ras(ph.ijk_to_ras, ph.hu.shape), 4.5)
    req = request_for("lesion", ph, anatomy=False)
    req.mask = Volume(mask, m)
    res = run("lesion", req, tiny_model_dir, tiny_controlnet_dirs)
    seg = res.segmentations["lesion"]
    assert np.array_equal(seg.ijk_to_ras, req.image.ijk_to_ras)
    assert 0 < seg.array.sum() < seg.array.size
    out = res.volumes["lesion"].array
    assert np.array_equal(out[~seg.array], ph.hu[~seg.array])
    assert res.messages == []


# ----------------------------------------------------------------------------- super-resolution
def test_superres_geometry_on_an_oblique_4mm_grid(tiny_model_dir, tiny_controlnet_dirs):
    m = oblique((4.0, 1.0, 1.0))
    ph = make_phantom(REGION, shape_kji=(4, 12, 12), spacing_kji=(4.0, 1.0, 1.0), seed=5, noise_hu=10.0,
                      ijk_to_ras=m)
    req = TaskRequest(image=ph.volume(), region=REGION, params={"steps": 1, "factor": 2})
    out = run("superres", req, tiny_model_dir, tiny_controlnet_dirs).volumes["superres"]
    assert out.array.shape == (8, 12, 12)
    np.testing.assert_allclose(out.spacing_kji, (2.0, 1.0, 1.0), rtol=0, atol=1e-12)
    d = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    shift_ijk = ((np.array([2.0, 1.0, 1.0]) - [4.0, 1.0, 1.0]) / 2)[::-1]
    np.testing.assert_allclose(out.ijk_to_ras[:3, 3], m[:3, 3] + d @ shift_ijk, rtol=0, atol=1e-9)
    np.testing.assert_allclose(first_corner(out.ijk_to_ras), first_corner(m), atol=1e-6)
    far_in = voxel_to_ras(m, np.array([11.5, 11.5, 3.5]))[0]
    far_out = voxel_to_ras(out.ijk_to_ras, np.array([11.5, 11.5, 7.5]))[0]
    np.testing.assert_allclose(far_out, far_in, atol=1e-6)


@pytest.fixture(scope="module")
def superres_runs(tiny_model_dir, tiny_controlnet_dirs):
    """2 mm slices, factor 2, with and without the self-check."""
    ph = make_phantom(REGION, shape_kji=(6, 14, 14), spacing_kji=(2.0, 1.0, 1.0), seed=9, noise_hu=10.0,
                      ijk_to_ras=oblique((2.0, 1.0, 1.0)))
    out = {}
    for check in (True, False):
        req = TaskRequest(image=ph.volume(), region=REGION, params={"steps": 2, "factor": 2, "self_check": check})
        out[check] = run("superres", req, tiny_model_dir, tiny_controlnet_dirs)
    return ph, out


@pytest.mark.parametrize("check", [True, False])
def test_superres_keeps_slab_means(superres_runs, check):
    ph, out = superres_runs
    res = out[check].volumes["superres"].array
    assert res.shape == (12, 14, 14)
    means = res.reshape(6, 2, 14, 14).astype(np.float64).mean(1)
    inside = ~preprocessing.outside_window(ph.hu, REGION)
    assert inside.sum() > 100
    np.testing.assert_allclose(means[inside], ph.hu[inside], rtol=0, atol=1e-3)


def test_superres_self_check_weighs_the_model_detail(superres_runs):
    ph, out = superres_runs
    checked, unchecked = out[True], out[False]
    assert unchecked.scores["model_weight"] == 1.0 and "self_check_gain_db" not in unchecked.scores
    w = checked.scores["model_weight"]
    assert 0.0 <= w <= 1.0 and checked.scores["self_check_gain_db"] >= 0.0
    # the unchecked run keeps all of the model's detail: the two voxels of a slab differ
    res = unchecked.volumes["superres"].array
    inside = ~preprocessing.outside_window(ph.hu, REGION)
    assert np.abs(res[0::2] - res[1::2])[inside].max() > 1.0


def test_superres_control_scale_reaches_the_controlnet(tiny_model_dir, tiny_controlnet_dirs, task_phantom):
    outs = [run("superres", request_for("superres", task_phantom, {"steps": 1, "control_scale": s}, anatomy=False),
                tiny_model_dir, tiny_controlnet_dirs).volumes["superres"].array for s in (0.0, 1.0)]
    assert not np.array_equal(*outs)


@pytest.mark.parametrize("params,match", [
    ({"factor": 1}, "factor"),
    ({"factor": (2, 1, 1)}, "factor"),
    ({"factor": 2.5}, "factor"),
    ({"noise_fraction": 0.0}, "noise_fraction"),
])
def test_superres_rejects_bad_parameters(tiny_model_dir, tiny_controlnet_dirs, task_phantom, params, match):
    with pytest.raises(ValueError, match=match):
        run("superres", request_for("superres", task_phantom, params), tiny_model_dir, tiny_controlnet_dirs)


# ----------------------------------------------------------------------------- cancel
@pytest.mark.parametrize("task", TASKS)
def test_cancel_stops_promptly(tiny_model_dir, tiny_controlnet_dirs, task_phantom, network_calls, task):
    req = request_for(task, task_phantom, {"batch_size": 1})
    copy = req.image.array.copy()
    rec = Recorder(cancel_after=1)
    with pytest.raises(Cancelled):
        run(task, req, tiny_model_dir, tiny_controlnet_dirs, progress=rec, cancel=rec.cancel)
    assert len(rec.fractions) == 1
    assert 1 <= len(network_calls) <= 2  # a full run makes at least 2 steps x 2 windows
    assert np.array_equal(req.image.array, copy) and req.image.array.flags.writeable


def test_inpaint_cancel_during_a_jump(tiny_model_dir, tiny_controlnet_dirs, task_phantom, network_calls):
    """A cancel that comes just before RePaint re-noises stops the run before the next network call."""
    p = {"steps": 3, "jump_length": 1, "jump_n_sample": 2, "batch_size": 8}
    seq = repaint_schedule(3, 1, 2)
    downs_before_jump = next(n for n, (a, b) in enumerate(zip(seq, seq[1:])) if b > a)
    rec = Recorder(cancel_after=downs_before_jump)
    with pytest.raises(Cancelled):
        run("inpaint", request_for("inpaint", task_phantom, p), tiny_model_dir, tiny_controlnet_dirs,
            progress=rec, cancel=rec.cancel)
    assert len(network_calls) == downs_before_jump


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def cli_files(tmp_path, task_phantom):
    folder = tmp_path / "data"
    folder.mkdir()
    ct, mask = folder / "ct.nii.gz", folder / "mask.nii.gz"
    io.write_volume(ct, task_phantom.volume())
    io.write_volume(mask, Volume(mask_of(task_phantom).array.astype(np.uint8), task_phantom.ijk_to_ras))
    return ct, mask


@pytest.mark.parametrize("task,exc", [("lesion", None), ("inpaint", KeyboardInterrupt), ("superres", None)])
def test_cli_interrupted_run_writes_nothing(interrupt_run_task, cli_files, tiny_model_dir, tiny_controlnet_dirs, capsys,
                                            task, exc):
    ct, mask = cli_files
    seen = interrupt_run_task(exc)
    before = sorted(p.name for p in ct.parent.iterdir())
    out = ct.parent / f"out_{task}.nii.gz"
    argv = [task, str(ct), "-o", str(out), "--model", str(tiny_model_dir), "--controlnet",
            str(tiny_controlnet_dirs[CN[task]]), "--device", "cpu", "--quiet", "--region", REGION, "--steps", "2"]
    if task in MASKED:
        argv += ["--mask", str(mask)]
    assert cli.main(argv) == 130
    assert len(seen) == 1
    assert not out.exists()
    assert sorted(p.name for p in ct.parent.iterdir()) == before  # no outputs, no temp files
    assert "nothing written" in capsys.readouterr().err


def test_cli_lesion_writes_image_and_segmentation(cli_files, tiny_model_dir, tiny_controlnet_dirs):
    ct, mask = cli_files
    out = ct.parent / "les.nii.gz"
    rc = cli.main(["lesion", str(ct), "--mask", str(mask), "-o", str(out), "--model", str(tiny_model_dir),
                   "--controlnet", str(tiny_controlnet_dirs["lesion"]), "--device", "cpu", "--quiet",
                   "--region", REGION, "--steps", "1"])
    assert rc == 0
    # the image and the segmentation share the name "lesion": neither may overwrite the other
    m = io.read_labelmap(mask)[0].array > 0
    image = io.read_volume(out).array
    assert image.dtype == np.float32 and image.shape == (8, 16, 14)
    assert np.array_equal(image[~m], io.read_volume(ct).array[~m])
    seg, _ = io.read_labelmap(ct.parent / "les_lesion.nii.gz")
    assert np.array_equal(seg.array > 0, m)


# ----------------------------------------------------------------------------- bad input
def _expect_value_error(task, request, model, cns, match):
    with pytest.raises(ValueError, match=match):
        run(task, request, model, cns)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("shape", [(16, 14), (2, 8, 16, 14)])
def test_rejects_non_3d_images(tiny_model_dir, tiny_controlnet_dirs, task_phantom, task, shape):
    req = request_for(task, task_phantom, anatomy=False)
    req.image = raw_volume(np.zeros(shape, np.float32), task_phantom.ijk_to_ras)
    _expect_value_error(task, req, tiny_model_dir, tiny_controlnet_dirs, "3-D")


@pytest.mark.parametrize("task", TASKS)
def test_rejects_nan(tiny_model_dir, tiny_controlnet_dirs, task_phantom, task):
    req = request_for(task, task_phantom, anatomy=False)
    req.image.array[1, 2, 3] = np.nan
    _expect_value_error(task, req, tiny_model_dir, tiny_controlnet_dirs, "NaN")


@pytest.mark.parametrize("task", TASKS)
def test_rejects_unknown_region(tiny_model_dir, tiny_controlnet_dirs, task_phantom, task):
    req = request_for(task, task_phantom, anatomy=False)
    req.region = "knee"
    _expect_value_error(task, req, tiny_model_dir, tiny_controlnet_dirs, "unknown region 'knee'")


@pytest.mark.parametrize("task", TASKS)
def test_rejects_unknown_parameter(tiny_model_dir, tiny_controlnet_dirs, task_phantom, task):
    req = request_for(task, task_phantom, {"jump_lenght": 2}, anatomy=False)
    _expect_value_error(task, req, tiny_model_dir, tiny_controlnet_dirs, r"unknown parameter\(s\) \['jump_lenght'\]")


@pytest.mark.parametrize("task", MASKED)
def test_rejects_missing_and_empty_masks(tiny_model_dir, tiny_controlnet_dirs, task_phantom, task):
    req = request_for(task, task_phantom, mask=False, anatomy=False)
    _expect_value_error(task, req, tiny_model_dir, tiny_controlnet_dirs, "needs a mask")
    req.mask = Volume(np.zeros(task_phantom.hu.shape, bool), task_phantom.ijk_to_ras)
    _expect_value_error(task, req, tiny_model_dir, tiny_controlnet_dirs, "mask is empty")


@pytest.mark.parametrize("task", MASKED)
def test_rejects_a_mask_outside_the_image(tiny_model_dir, tiny_controlnet_dirs, task_phantom, task):
    """A full mask of another shape on a grid 500 mm away: empty once on the image grid."""
    m = make_ijk_to_ras((1.5, 1.5, 1.5), centre_ras(task_phantom.ijk_to_ras, task_phantom.hu.shape) + 500.0)
    req = request_for(task, task_phantom, mask=False, anatomy=False)
    req.mask = Volume(np.ones((5, 6, 7), np.uint8), m)
    _expect_value_error(task, req, tiny_model_dir, tiny_controlnet_dirs, "mask is empty on the image grid")


def test_inpaint_rejects_unknown_content(tiny_model_dir, tiny_controlnet_dirs, task_phantom):
    req = request_for("inpaint", task_phantom, {"content": "tumour"}, anatomy=False)
    _expect_value_error("inpaint", req, tiny_model_dir, tiny_controlnet_dirs, "content")


@pytest.mark.parametrize("task,wrong", [("superres", "lesion"), ("lesion", "superres"), ("inpaint", "superres")])
def test_a_controlnet_of_another_task_is_refused(tiny_model_dir, tiny_controlnet_dirs, task_phantom, task, wrong):
    req = request_for(task, task_phantom, {"steps": 1, "factor": 2} if task == "superres" else None,
                      anatomy=False)
    with pytest.raises(ValueError, match=f"trained for '{wrong}'"):
        run_task(task, req, tiny_model_dir, controlnet=tiny_controlnet_dirs[wrong], device="cpu")


# ----------------------------------------------------------------------------- RePaint schedule
SCHEDULES = [(10, 3, 2), (10, 3, 1), (20, 4, 3), (7, 2, 5), (5, 10, 3), (1, 1, 2), (12, 1, 2), (9, 3, 2)]


@pytest.mark.parametrize("steps,jump_length,jump_n_sample", SCHEDULES)
def test_repaint_schedule_shape(steps, jump_length, jump_n_sample):
    seq = repaint_schedule(steps, jump_length, jump_n_sample)
    assert seq[0] == steps - 1 and seq[-1] == -1
    assert all(-1 <= t <= steps - 1 for t in seq)
    moves = np.diff(seq)
    assert set(moves.tolist()) <= {-1, 1}
    assert -1 not in seq[:-1]
    # upward moves come in runs of exactly jump_length
    runs, n = [], 0
    for mv in moves:
        if mv > 0:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    assert n == 0  # the schedule never ends going up
    assert all(r == jump_length for r in runs), runs
    downs = int((moves < 0).sum())
    assert downs == steps + len(runs) * jump_length
    expected_jumps = (jump_n_sample - 1) * len(range(0, steps - jump_length, jump_length))
    assert len(runs) == expected_jumps


@pytest.mark.parametrize("steps,jump_length", [(10, 3), (4, 1), (1, 1), (6, 9)])
def test_repaint_schedule_without_resampling_is_monotone(steps, jump_length):
    assert repaint_schedule(steps, jump_length, 1) == list(range(steps - 1, -2, -1))


@pytest.mark.parametrize("bad", [(5, 0, 2), (5, 2, 0)])
def test_repaint_schedule_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="jump"):
        repaint_schedule(*bad)
