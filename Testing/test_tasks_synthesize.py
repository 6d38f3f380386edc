"""Synthesis through ``run_task``: the grid it samples on, and the anatomy layout it can start from.

A tiny random foundation model on the ``task_phantom`` fixture's oblique, anisotropic grid.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedDiffFMLib import anatomy, preprocessing
from MedDiffFMLib.tasks import TaskRequest, run_task

from task_requests import REGION, request_for

pytestmark = pytest.mark.usefixtures("single_thread")


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


def test_synthesize_needs_a_region_without_image(tiny_model_dir):
    req = TaskRequest(region=None, params={"steps": 1, "shape": (4, 4, 4)})
    with pytest.raises(ValueError, match="region"):
        run_task("synthesize", req, tiny_model_dir, device="cpu")


def test_typical_hu_follows_the_group_order_and_the_phase():
    groups = np.arange(len(anatomy.GROUP_NAMES) + 2, dtype=np.int8).reshape(1, 1, -1)
    for phase in anatomy.CONTRAST_PHASES:
        table = anatomy.TYPICAL_HU[phase]
        expected = [table["outside"], table["body tissue"]] + [table[g] for g in anatomy.GROUP_NAMES]
        np.testing.assert_array_equal(anatomy.typical_hu(groups, phase)[0, 0], expected)
    # from class names: liver, right kidney, background
    groups, _ = anatomy.group_map(np.array([[[5, 2, 0]]]))
    native = anatomy.TYPICAL_HU["native"]
    np.testing.assert_array_equal(anatomy.typical_hu(groups, "native"),
                                  [[[native["liver"], native["kidney"], native["outside"]]]])
    with pytest.raises(ValueError, match="contrast phase"):
        anatomy.typical_hu(groups, "delayed")


def test_synthesis_starts_from_the_layout_of_the_phase_asked_for(tiny_model_dir, task_phantom):
    """Started late in the chain, even the random model keeps the layout: each group comes back
    near its typical HU in the phase asked for. From pure noise the phase changes nothing, and
    without anatomy there is no layout to start from."""
    def synth(anat=True, **params):
        req = request_for("synthesize", task_phantom, params, anatomy=anat)
        return req, run_task("synthesize", req, tiny_model_dir, device="cpu").volumes["synthetic"].array

    req, native = synth(layout_start=0.05, contrast_phase="native")
    _, arterial = synth(layout_start=0.05, contrast_phase="arterial")
    groups, _ = anatomy.group_map(req.anatomy.array, req.anatomy_names)
    lo, hi = preprocessing.window_bounds(REGION)  # the model's output lies in the region's window
    names = ["body tissue", *anatomy.GROUP_NAMES]
    checked = []
    for value in np.unique(groups[groups > 0]):
        inside = groups == value
        if inside.sum() < 10:
            continue
        name = names[value - 1]
        checked.append(name)
        for out, phase in ((native, "native"), (arterial, "arterial")):
            typical = np.clip(anatomy.TYPICAL_HU[phase][name], lo, hi)
            assert abs(float(out[inside].mean()) - typical) < 15.0, (name, phase)
    assert {"liver", "bone", "lung"} <= set(checked)
    liver = groups == 2 + anatomy.GROUP_NAMES.index("liver")
    step = anatomy.TYPICAL_HU["arterial"]["liver"] - anatomy.TYPICAL_HU["native"]["liver"]
    assert float(arterial[liver].mean() - native[liver].mean()) == pytest.approx(step, abs=5.0)
    # from pure noise there is no layout, whatever the phase; the default starts from one
    assert np.array_equal(synth(layout_start=1.0, contrast_phase="native")[1],
                          synth(layout_start=1.0, contrast_phase="arterial")[1])
    assert not np.array_equal(synth()[1], synth(layout_start=1.0)[1])
    # without anatomy there is no layout to start from
    assert np.array_equal(synth(anat=False, layout_start=0.05)[1], synth(anat=False, layout_start=1.0)[1])
