"""Super-resolution through ``run_task``: the exact new grid on oblique grids, slab means, the
self-check, the control scale and bad parameters (tiny random base and ControlNet)."""

from __future__ import annotations

import numpy as np
import pytest

from MedDiffFMLib import preprocessing
from MedDiffFMLib.geometry import voxel_to_ras
from MedDiffFMLib.phantoms import make_phantom
from MedDiffFMLib.tasks import TaskRequest

from controlnet_helpers import REGION, first_corner, oblique, request_for, run  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


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
    outside = preprocessing.outside_window(ph.hu, REGION)
    assert outside.sum() > 20 and (~outside).sum() > 100  # air and bone as well as soft tissue
    np.testing.assert_allclose(means, ph.hu, rtol=0, atol=1e-3)  # every slab, in the window or not
    assert out[check].scores["slab_mean_error_hu"] == pytest.approx(float(np.abs(means - ph.hu).max()), abs=1e-4)


def test_superres_self_check_weighs_the_model_detail(superres_runs):
    ph, out = superres_runs
    checked, unchecked = out[True], out[False]
    assert unchecked.scores["model_weight"] == 1.0 and "self_check_gain_db" not in unchecked.scores
    w = checked.scores["model_weight"]
    assert 0.0 <= w <= 1.0 and checked.scores["self_check_gain_db"] >= 0.0  # a clipped least-squares step
    # the unchecked run keeps all of the model's detail: the two voxels of a slab differ
    res = unchecked.volumes["superres"].array
    inside = ~preprocessing.outside_window(ph.hu, REGION)
    assert np.abs(res[0::2] - res[1::2])[inside].max() > 1.0


def test_superres_control_scale_reaches_the_controlnet(tiny_model_dir, tiny_controlnet_dirs, task_phantom):
    outs = [run("superres", request_for("superres", task_phantom, {"steps": 1, "control_scale": s, "self_check": False},
                                        anatomy=False),
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


def test_superres_without_room_for_a_self_check_returns_the_classical_slabs(tiny_model_dir, tiny_controlnet_dirs):
    """Three slices cannot be checked at factor 2 (one slab of 2 at the thicker level): the result is the
    classical total-variation reconstruction, the model's detail left out, and the message says so."""
    import torch

    from MedDiffFMLib.slab_tv import slab_tv

    ph = make_phantom(REGION, shape_kji=(3, 12, 12), spacing_kji=(3.0, 1.0, 1.0), seed=4, noise_hu=0.0,
                      ijk_to_ras=oblique((3.0, 1.0, 1.0)))
    res = run("superres", TaskRequest(image=ph.volume(), region=REGION, params={"steps": 1, "factor": 2}),
              tiny_model_dir, tiny_controlnet_dirs)
    assert any("self-check impossible" in m for m in res.messages)
    assert res.scores["model_weight"] == 0.0
    expect = slab_tv(torch.from_numpy(ph.hu.astype(np.float64)), 2, (1.5, 1.0, 1.0)).float().numpy()
    np.testing.assert_allclose(res.volumes["superres"].array, expect, rtol=0, atol=1e-3)


def test_superres_skips_the_main_pass_when_the_check_keeps_no_detail(tiny_model_dir, tiny_controlnet_dirs,
                                                                     monkeypatch):
    """A model whose detail is zero gets weight 0 on the check; the main pass, whose detail would be
    multiplied by 0, is not run, and the result is the classical total-variation reconstruction."""
    import torch

    from MedDiffFMLib.slab_tv import slab_tv
    from MedDiffFMLib.tasks import superres

    real, calls = superres._model_pass, []

    def no_detail(*args, **kwargs):
        base, detail = real(*args, **kwargs)
        calls.append(base.shape)
        return base, torch.zeros_like(detail)

    monkeypatch.setattr(superres, "_model_pass", no_detail)
    ph = make_phantom(REGION, shape_kji=(6, 12, 12), spacing_kji=(3.0, 1.0, 1.0), seed=6, noise_hu=5.0,
                      ijk_to_ras=oblique((3.0, 1.0, 1.0)))
    reports = []
    res = run("superres", TaskRequest(image=ph.volume(), region=REGION, params={"steps": 1, "factor": 2}),
              tiny_model_dir, tiny_controlnet_dirs, progress=reports.append)
    assert calls == [(6, 12, 12)]  # the check (3 slabs of 2 -> 6 slices) only
    assert res.scores["model_weight"] == 0.0 and reports[-1].fraction == 1.0
    expect = slab_tv(torch.from_numpy(ph.hu.astype(np.float64)), 2, (1.5, 1.0, 1.0)).float().numpy()
    np.testing.assert_allclose(res.volumes["superres"].array, expect, rtol=0, atol=1e-3)


def _superres_dir_with(tmp_path, tiny_controlnet_dirs, interpolation):
    """A copy of the tiny super-resolution ControlNet whose config names ``interpolation``
    (None: no entry, as in ControlNets trained on linear interpolation)."""
    import json
    import shutil

    d = tmp_path / f"superres_{interpolation}"
    shutil.copytree(tiny_controlnet_dirs["superres"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["params"].pop("interpolation", None)
    if interpolation is not None:
        cfg["params"]["interpolation"] = interpolation
    (d / "config.json").write_text(json.dumps(cfg))
    return {**tiny_controlnet_dirs, "superres": d}


def test_superres_condition_follows_the_controlnet_config(tiny_model_dir, tiny_controlnet_dirs, tmp_path,
                                                          monkeypatch):
    """The condition is built the way the ControlNet was trained, as its config says: parabolic slabs for
    the bundled weights, linear interpolation where the config has no entry; an unknown name is refused."""
    import torch

    from MedDiffFMLib.conditions import slab_interpolate, slab_parabolic
    from MedDiffFMLib.sampling import denoiser as denoiser_module

    seen = []
    real = denoiser_module.PatchSampler.denoiser

    def record(self, cond, shape):
        seen.append(cond.control[0].clone())
        return real(self, cond, shape)

    monkeypatch.setattr(denoiser_module.PatchSampler, "denoiser", record)
    ph = make_phantom(REGION, shape_kji=(4, 10, 10), spacing_kji=(3.0, 1.0, 1.0), seed=7, noise_hu=5.0,
                      ijk_to_ras=oblique((3.0, 1.0, 1.0)))
    thick = torch.from_numpy(preprocessing.hu_to_unit(ph.hu, REGION))
    for interpolation, expect in ((None, slab_interpolate(thick, 2)), ("parabolic", slab_parabolic(thick, 2).float())):
        seen.clear()
        run("superres", TaskRequest(image=ph.volume(), region=REGION, params={"steps": 1, "factor": 2,
                                                                               "self_check": False}),
            tiny_model_dir, _superres_dir_with(tmp_path, tiny_controlnet_dirs, interpolation))
        assert len(seen) == 1
        torch.testing.assert_close(seen[0], expect, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="names the condition interpolation 'cubic'"):
        run("superres", TaskRequest(image=ph.volume(), region=REGION, params={"steps": 1, "factor": 2}),
            tiny_model_dir, _superres_dir_with(tmp_path, tiny_controlnet_dirs, "cubic"))
