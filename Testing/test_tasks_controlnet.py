"""The ControlNet tasks (superres, lesion, inpaint) through ``run_task`` and the CLI, and the
RePaint schedule.

Tiny random base (1 mm) and tiny ControlNets (conftest ``tiny_controlnet_dirs``), small
phantoms on oblique, anisotropic grids. Checked: outputs and their grids (super-resolution:
the exact new grid), seeds, inputs left alone, voxels outside the mask bit for bit,
cancellation, progress and input validation. Super-resolution's own checks: test_tasks_superres.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedDiffFMLib import cli, io, preprocessing
from MedDiffFMLib.geometry import make_ijk_to_ras
from MedDiffFMLib.tasks import Cancelled, TaskRequest, run_task
from MedDiffFMLib.sampling import repaint_schedule
from MedDiffFMLib.volume import Volume

from conftest import Recorder
from controlnet_helpers import (CN, MASKED, OUTPUTS, PARAMS, REGION, TASKS, UNKNOWN_NAME, ball_mask,  # noqa: E402
                                centre_ras, first_corner, mask_of, raw_volume, request_for, run)

pytestmark = pytest.mark.usefixtures("single_thread")


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


START_NEAR_THE_IMAGE = {"lesion": {"noise_fraction": 0.05}}  # random weights would push all content to the window


@pytest.mark.parametrize("task", MASKED)
def test_new_content_gets_the_image_noise(tiny_model_dir, tiny_controlnet_dirs, task):
    """The generated voxels carry the scan's own noise level; the voxels outside the mask and
    the model's part of the content are the same with or without it."""
    from conftest import task_grid

    m, shape, noise_hu = task_grid(), (12, 24, 24), 15.0
    hu = (40.0 + np.random.default_rng(5).normal(0.0, noise_hu, shape)).astype(np.float32)
    mask = Volume(ball_mask(m, shape, centre_ras(m, shape), 5.0), m)
    out = {}
    for match in (False, True):
        req = TaskRequest(image=Volume(hu.copy(), m), region=REGION, mask=mask,
                          params={**PARAMS[task], **START_NEAR_THE_IMAGE.get(task, {}), "match_noise": match})
        out[match] = run(task, req, tiny_model_dir, tiny_controlnet_dirs).volumes[next(iter(OUTPUTS[task][0]))].array
    inside = mask.array
    assert np.array_equal(out[True][~inside], hu[~inside]) and np.array_equal(out[False][~inside], hu[~inside])
    lo, hi = preprocessing.window_bounds(REGION)  # content is kept inside the window: noise there is clipped
    unclipped = inside & (out[False] > lo + 4 * noise_hu) & (out[False] < hi - 4 * noise_hu)
    added = (out[True] - out[False])[unclipped]
    assert unclipped.sum() > 50 and abs(added.mean()) < 0.3 * noise_hu
    assert added.std() == pytest.approx(noise_hu, rel=0.2)


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


# ----------------------------------------------------------------------------- cancel
@pytest.mark.parametrize("task", TASKS)
def test_cancel_stops_promptly(tiny_model_dir, tiny_controlnet_dirs, task_phantom, network_calls, task):
    req = request_for(task, task_phantom, {"batch_size": 1})
    copy = req.image.array.copy()
    rec = Recorder(cancel_after=1)
    with pytest.raises(Cancelled):
        run(task, req, tiny_model_dir, tiny_controlnet_dirs, progress=rec, cancel=rec.cancel)
    assert len(rec.fractions) == 1
    assert len(network_calls) <= 2 and (task == "superres" or len(network_calls) >= 1)  # superres: maybe in its slabs
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


@pytest.mark.parametrize("content", ["healthy", "lesion"])
def test_inpaint_control_shows_surrounding_tissue_for_healthy_content(tiny_model_dir, tiny_controlnet_dirs,
                                                                      task_phantom, monkeypatch, content):
    """Healthy content: no lesion mask and, inside the mask, the median of the tissue around it
    (what the ControlNet saw for healthy cases: an intact image), never the replaced content nor
    a blank. Lesion content: the mask and the blank, as in training."""
    from MedDiffFMLib import conditions
    from MedDiffFMLib.tasks import inpaint
    from MedDiffFMLib.tasks.common import Models
    from MedDiffFMLib.tasks.registry import TASKS

    seen = []
    original = conditions.lesion_condition
    def recording(image, mask):
        seen.append(original(image, mask))
        return seen[-1]

    monkeypatch.setattr(conditions, "lesion_condition", recording)
    req = request_for("inpaint", task_phantom, {"content": content}, anatomy=False)
    run("inpaint", req, tiny_model_dir, tiny_controlnet_dirs)
    params = {**{k: v.default for k, v in TASKS["inpaint"].params.items()}, **req.params}
    models = Models.resolve(TASKS["inpaint"], tiny_model_dir, tiny_controlnet_dirs["lesion"])
    plan = inpaint.prepare(req, params, models)
    y, m = plan.box_tensors("cpu")
    (control,) = seen
    assert torch.equal(control[1][~m], y[~m])
    if content == "healthy":
        fill = inpaint.surrounding_median(plan.unit_box, plan.mask[plan.box], req.image.spacing_kji)
        assert not control[0].any()
        assert torch.all(control[1][m] == fill) and abs(fill - conditions.BLANK_VALUE) > 1e-3
    else:
        assert torch.equal(control[0].bool(), m) and torch.all(control[1][m] == conditions.BLANK_VALUE)


def test_surrounding_median_reads_the_shell_around_the_mask():
    from MedDiffFMLib.tasks.inpaint import surrounding_median

    unit = np.full((12, 12, 12), -0.8, np.float32)
    unit[2:10, 2:10, 2:10] = 0.3  # the organ
    unit[5:7, 5:7, 5:7] = 0.9  # the lesion being removed
    mask = np.zeros(unit.shape, bool)
    mask[5:7, 5:7, 5:7] = True
    assert surrounding_median(unit, mask, (1.0, 1.0, 1.0)) == pytest.approx(0.3)


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
