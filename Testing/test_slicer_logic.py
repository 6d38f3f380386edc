"""The module's node logic against a real MRML scene (``slicer-core`` wheel, no Slicer app).

The scene is stood up as Slicer's application (and trame-slicer) does it: a
vtkSlicerApplicationLogic with the default colour nodes, and the volumes, segmentations and
subject hierarchy logics registered (``MedDiffFMSlicer.headless``). Tasks are a stand-in runner
whose outputs are written by hand below (not read from the registry or the module), plus one
real run of ``run_task`` on the tiny model.
"""

from __future__ import annotations

import numpy as np
import pytest
from slicer_scene import (SHAPE, add_segment, add_volume, all_node_ids, app, assert_untouched, ct,  # noqa: F401
                          node_array, node_matrix, sh_item_count, slicer, vtk_matrix)

from MedDiffFMLib.tasks.base import Cancelled, TaskResult
from MedDiffFMLib.volume import Volume
from MedDiffFMSlicer import display, nodes, outputs

# What each task returns (volumes, segmentations), written by hand from the task modules.
TASK_OUTPUTS = {
    "denoise": (("denoised",), ()),
    "anomaly": (("anomaly_map", "reconstruction"), ("anomaly",)),
    "synthesize": (("synthetic",), ()),
    "superres": (("superres",), ()),
    "lesion": (("lesion",), ("lesion",)),
    "inpaint": (("inpainted",), ("inpainted_region",)),
}
# The node names users see (README, "The tasks, as clicks") and the outputs that an existing
# "output volume" / "output segmentation" node receives.
NODE_NAMES = {
    "denoised": "CT denoised", "anomaly_map": "CT anomaly map", "reconstruction": "CT anomaly reconstruction",
    "anomaly_segmentation": "CT anomaly segmentation", "synthetic": "CT synthetic", "superres": "CT super-resolution",
    "lesion": "CT lesion", "lesion_segmentation": "CT lesion segmentation", "inpainted": "CT inpainted",
    "inpainted_region_segmentation": "CT inpainted region segmentation",
}
PRIMARY = {"denoise": ("denoised", None), "anomaly": ("anomaly_map", "anomaly"), "synthesize": ("synthetic", None),
           "superres": ("superres", None), "lesion": ("lesion", "lesion"), "inpaint": ("inpainted", "inpainted_region")}
MASK_TASKS = ("lesion", "inpaint")


class FakeRunner:
    """run_task's signature; returns :data:`TASK_OUTPUTS` on the input grid (superres: a grid
    of half the slice spacing)."""

    def __init__(self, fail=None):
        self.fail = fail
        self.calls = []

    def __call__(self, task, request, model=None, *, controlnet=None, device="auto", progress=None, cancel=None):
        self.calls.append((task, request, model, controlnet, device))
        if self.fail is not None:
            raise self.fail
        img = request.image
        volume_names, segment_names = TASK_OUTPUTS[task]
        volumes, segments = {}, {}
        for n, name in enumerate(volume_names):
            volumes[name] = Volume((img.array - 1 - n).astype(np.float32), img.ijk_to_ras)
        if task == "superres":
            m = img.ijk_to_ras.copy()
            m[:3, 2] /= 2  # half the slice spacing
            m[:3, 3] -= img.ijk_to_ras[:3, 2] / 4  # keep the slab's extent
            volumes["superres"] = Volume((np.repeat(img.array, 2, axis=0) + 0.5).astype(np.float32), m)
        if task == "anomaly":  # a z-score-like map
            z = np.abs(img.array - img.array.mean()) / img.array.std()
            volumes["anomaly_map"] = Volume(z.astype(np.float32), img.ijk_to_ras)
        for name in segment_names:
            mask = request.mask.array if request.mask is not None else volumes["anomaly_map"].array > 1.5
            segments[name] = Volume(np.asarray(mask).copy(), img.ijk_to_ras)
        return TaskResult(volumes=volumes, segmentations=segments, scores={"anomaly_score": 0.73},
                          summary=f"{task} done")


def drawn_mask(scene, m, box=(slice(3, 5), slice(4, 7), slice(5, 9))):
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Drawn")
    mask = np.zeros(SHAPE, bool)
    mask[box] = True
    return seg, add_segment(seg, mask, m, "where"), mask


# ---------------------------------------------------------------------------------------------
# Inputs


def test_volume_round_trip_is_exact(ct):
    node, array, m, _ = ct
    mtime = node.GetImageData().GetMTime()
    vol = nodes.volume_from_node(node)
    assert vol.array.dtype == np.float32 and vol.array.shape == SHAPE
    assert np.array_equal(vol.array, array.astype(np.float32))
    assert np.array_equal(vol.ijk_to_ras, m)  # bit for bit: no orientation conventions in between
    vol.array[:] = 0  # the Volume is a copy: the node does not change
    assert_untouched(node, array, m, mtime)
    back = outputs.new_volume_node(node.GetScene(), nodes.volume_from_node(node), "copy")
    assert np.array_equal(node_array(back), array.astype(np.float32))
    assert np.array_equal(node_matrix(back), m)


def test_segment_is_resampled_onto_the_input_grid(app, ct):
    node, array, m, _ = ct
    scene = app.scene
    # the segment lives on a grid of half the spacing, whose voxel 2n has the input voxel n's centre
    fine = m.copy()
    fine[:3, :3] = m[:3, :3] / 2
    fine_mask = np.zeros(tuple(2 * s for s in SHAPE), bool)
    k0, k1, j0, j1, i0, i1 = 2, 6, 3, 9, 4, 11
    fine_mask[2 * k0:2 * k1 - 1, 2 * j0:2 * j1 - 1, 2 * i0:2 * i1 - 1] = True
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mask")
    sid = add_segment(seg, fine_mask, fine, "lesion")
    mask = nodes.mask_from_segment(seg, sid, node)
    expected = np.zeros(SHAPE, bool)
    expected[k0:k1, j0:j1, i0:i1] = True
    assert mask.array.dtype == bool and mask.array.shape == SHAPE
    assert np.array_equal(mask.ijk_to_ras, m)
    assert np.array_equal(mask.array, expected)
    # a parent transform on the segmentation moves the mask by one voxel along i
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[:3, 3] = m[:3, 0]
    transform.SetMatrixTransformToParent(vtk_matrix(shift))
    seg.SetAndObserveTransformNodeID(transform.GetID())
    moved = nodes.mask_from_segment(seg, sid, node)
    assert np.array_equal(moved.array, np.roll(expected, 1, axis=2))
    with pytest.raises(ValueError, match="not in"):
        nodes.mask_from_segment(seg, "no-such-segment", node)


def test_closed_surface_segment_gives_its_mask(app):
    """Defect 4: a segmentation held only as closed surfaces (e.g. imported from a model) gave an
    empty mask; it is converted to a binary labelmap first, as Slicer's export does."""
    from vtkmodules.vtkFiltersSources import vtkCubeSource

    scene = app.scene
    m = np.diag([1.0, 1.0, 2.0, 1.0])
    reference = add_volume(scene, np.zeros((16, 24, 24), np.int16), m, "grid")
    cube = vtkCubeSource()
    cube.SetBounds(5.5, 13.5, 7.5, 15.5, 9.0, 19.0)  # 8 x 8 x 10 mm: 8 x 8 x 5 voxels = 320
    cube.Update()
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Surface")
    seg.SetSourceRepresentationToClosedSurface()  # as a segmentation loaded from a .seg.vtm file
    sid = seg.AddSegmentFromClosedSurfaceRepresentation(cube.GetOutput(), "lesion", [1.0, 0.0, 0.0])
    assert not seg.GetSegmentation().ContainsRepresentation(nodes.BINARY_LABELMAP)
    mask = nodes.mask_from_segment(seg, sid, reference)
    assert 0.8 * 320 <= mask.array.sum() <= 1.25 * 320, mask.array.sum()
    kk, jj, ii = np.nonzero(mask.array)
    assert 4 <= kk.min() and kk.max() <= 10 and 5 <= ii.min() and ii.max() <= 14
    assert seg.GetSegmentation().GetSourceRepresentationName() == "Closed surface"  # source kept
    outputs.remove_node(seg)
    outputs.remove_node(reference)


def test_anatomy_segmentation_to_label_map_and_names(app, ct):
    node, _, m, _ = ct
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TotalSegmentator")
    a = np.zeros(SHAPE, bool)
    a[1:4, 2:6, 3:7] = True
    b = np.zeros(SHAPE, bool)
    b[5:8, 6:10, 8:12] = True
    add_segment(seg, a, m, "liver", "liver")
    add_segment(seg, b, m, "right kidney", "kidney_right")  # standard name shown, class kept as ID
    labels, names = nodes.labelmap_from_segmentation(seg, node)
    assert np.array_equal(labels.ijk_to_ras, m)
    assert set(np.unique(labels.array)) == {0, 1, 2}
    assert np.array_equal(labels.array == 1, a) and np.array_equal(labels.array == 2, b)
    known = {"liver", "kidney_right"}
    assert nodes.segment_class_name("kidney_right", "right kidney", known) == "kidney_right"
    assert nodes.segment_class_name("Segment_1", "Liver", known) == "liver"
    assert nodes.segment_class_name("Segment_2", "Left lung", None) == "left_lung"
    assert names[1] == "liver"
    request = nodes.build_request(node, params={"steps": 2}, region="auto", anatomy_segmentation=seg)
    assert request.region is None and request.anatomy_names == names and request.params == {"steps": 2}


@pytest.mark.parametrize("task, kwargs, message", [
    ("sharpen", {}, "unknown task"),
    ("denoise", {"params": {"steps": 0}}, "steps"),
    ("denoise", {"params": {"stepz": 2}}, "stepz"),
    ("denoise", {"region": "knee"}, "region"),
    ("inpaint", {}, "mask"),
])
def test_bad_input_is_refused_before_any_work(ct, task, kwargs, message):
    node, array, m, _ = ct
    runner = FakeRunner()
    with pytest.raises(ValueError, match=message):
        nodes.process(node, task, runner=runner, **kwargs)
    assert runner.calls == []


# ---------------------------------------------------------------------------------------------
# Results


def test_every_task_makes_its_outputs_under_the_names_users_see(app, ct):
    node, array, m, _ = ct
    seg, _, _ = drawn_mask(app.scene, m)
    for task, (volume_names, segment_names) in TASK_OUTPUTS.items():
        kwargs = {"mask_segmentation": seg} if task in MASK_TASKS else {}
        out = nodes.process(node, task, runner=FakeRunner(), **kwargs)
        assert set(out) == set(volume_names) | {s + "_segmentation" for s in segment_names}, task
        for key, n in out.items():
            assert n.GetName() == NODE_NAMES[key], (task, key)
            assert n.GetAttribute("MedDiffFM.task") == task
            outputs.remove_node(n)


@pytest.mark.parametrize("task", list(TASK_OUTPUTS))
def test_existing_output_nodes_receive_the_primary_outputs(app, ct, task):
    node, array, m, _ = ct
    scene = app.scene
    seg, _, mask = drawn_mask(scene, m)
    out_vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my output")
    out_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my segmentation")
    primary_volume, primary_segment = PRIMARY[task]
    out = nodes.process(node, task, runner=FakeRunner(), mask_segmentation=seg if task in MASK_TASKS else None,
                        output_volume=out_vol, output_segmentation=out_seg)
    assert out[primary_volume] is out_vol and out_vol.GetName() == "my output"
    if primary_segment is None:
        assert out_seg.GetSegmentation().GetNumberOfSegments() == 0
    else:
        assert out[primary_segment + "_segmentation"] is out_seg
        sid = out_seg.GetSegmentation().GetNthSegmentID(0)
        if task in MASK_TASKS:
            assert np.array_equal(nodes.mask_from_segment(out_seg, sid, node).array, mask)
    assert all(n is out_vol or n.GetName() == NODE_NAMES[k] for k, n in out.items() if n is not out_seg)
    with pytest.raises(ValueError, match="must not be the input"):
        nodes.process(node, "denoise", runner=FakeRunner(), output_volume=node)


def test_anomaly_map_threshold_legend_and_segment_terminology(app, ct):
    node, array, m, study = ct
    mtime = node.GetImageData().GetMTime()
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    runner = FakeRunner()
    out = nodes.process(node, "anomaly", runner=runner, params={"steps": 4, "threshold": 1.5}, model="tiny",
                        device="cpu")
    assert runner.calls[0][2] == "tiny" and runner.calls[0][4] == "cpu"
    amap, recon, seg = out["anomaly_map"], out["reconstruction"], out["anomaly_segmentation"]
    d = amap.GetDisplayNode()
    # heat colours from the threshold up; below it transparent (no darkened overlay); a legend
    assert d.GetColorNodeID() == display.heat_color_node_id(app.scene) and d.GetColorNodeID()
    assert d.GetApplyThreshold() and d.GetLowerThreshold() == pytest.approx(1.5)
    assert d.GetWindowLevelMin() == pytest.approx(1.5)
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(amap)
    assert legend is not None and legend.GetTitleText() == "anomaly (z)"
    display.set_anomaly_threshold(amap, 2.5)
    assert d.GetLowerThreshold() == pytest.approx(2.5)
    assert recon.GetDisplayNode().GetWindow() == pytest.approx(400)  # input's window/level
    # the segment: SNOMED CT "Lesion" (52988006) under "Morphologically Altered Structure"
    segment = seg.GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == "Lesion" and "SCT^52988006^Lesion" in segment.GetTerminology()
    assert "SCT^49755003^Morphologically Altered Structure" in segment.GetTerminology()
    expected = np.abs(array - array.mean()) / array.std() > 1.5
    sid = seg.GetSegmentation().GetNthSegmentID(0)
    assert np.array_equal(nodes.mask_from_segment(seg, sid, node).array, expected)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    for n in out.values():
        assert sh.GetItemParent(sh.GetItemByDataNode(n)) == study
        assert n.GetTransformNodeID() == transform.GetID()
        assert float(n.GetAttribute("MedDiffFM.score.anomaly_score")) == pytest.approx(0.73)
    assert_untouched(node, array, m, mtime)
    # without a threshold parameter the map uses the anomaly task's default (robust z > 4)
    out = nodes.process(node, "anomaly", runner=FakeRunner())
    assert out["anomaly_map"].GetDisplayNode().GetLowerThreshold() == pytest.approx(4.0)


@pytest.mark.parametrize("task, params, name, code, rgb", [
    ("lesion", {}, "Mass", "4147007", (144, 238, 144)),
    ("inpaint", {"content": "lesion"}, "Mass", "4147007", (144, 238, 144)),
    ("inpaint", {"content": "healthy"}, "Tissue", "85756007", (128, 174, 128)),
])
def test_generated_segments_get_standard_names_and_colours(app, ct, task, params, name, code, rgb):
    node, array, m, _ = ct
    seg, _, _ = drawn_mask(app.scene, m)
    out = nodes.process(node, task, runner=FakeRunner(), params=params, mask_segmentation=seg)
    (segmentation,) = [n for k, n in out.items() if k.endswith("_segmentation")]
    segment = segmentation.GetSegmentation().GetNthSegment(0)
    assert segment.GetName() == name and f"SCT^{code}^{name}" in segment.GetTerminology()
    assert np.allclose(segment.GetColor(), np.array(rgb) / 255.0)


def test_show_in_3d_makes_surfaces(app, ct):
    node, array, m, _ = ct
    seg, _, _ = drawn_mask(app.scene, m)
    out = nodes.process(node, "lesion", runner=FakeRunner(), mask_segmentation=seg)
    result = out["lesion_segmentation"]
    display.show_in_3d(result)
    assert result.GetSegmentation().ContainsRepresentation("Closed surface")
    assert result.GetDisplayNode().GetVisibility3D()
    display.show_in_3d(result, False)
    assert not result.GetDisplayNode().GetVisibility3D()


def test_superres_output_has_the_new_grid(app, ct):
    node, array, m, study = ct
    mtime = node.GetImageData().GetMTime()
    sr = nodes.process(node, "superres", runner=FakeRunner())["superres"]
    expected = m.copy()
    expected[:3, 2] /= 2
    expected[:3, 3] -= m[:3, 2] / 4
    assert np.array_equal(node_matrix(sr), expected)
    assert np.array_equal(node_array(sr), np.repeat(array.astype(np.float32), 2, axis=0) + 0.5)
    assert_untouched(node, array, m, mtime)


@pytest.mark.parametrize("error", [ValueError("the image is empty"), Cancelled("cancelled")])
def test_nothing_is_created_when_the_task_fails_or_is_cancelled(app, ct, error):
    node, array, m, _ = ct
    scene = app.scene
    mtime = node.GetImageData().GetMTime()
    before, items = all_node_ids(scene), sh_item_count(scene)
    with pytest.raises(type(error)):
        nodes.process(node, "anomaly", runner=FakeRunner(fail=error))
    assert all_node_ids(scene) == before and sh_item_count(scene) == items
    assert_untouched(node, array, m, mtime)


def test_nodes_are_removed_again_when_adding_them_fails(app, ct, monkeypatch):
    node, array, m, _ = ct
    scene = app.scene
    before, items = all_node_ids(scene), sh_item_count(scene)

    def broken(volume_node, threshold):
        raise RuntimeError("display failed")

    monkeypatch.setattr(display, "show_anomaly_map", broken)
    with pytest.raises(RuntimeError, match="display failed"):
        nodes.process(node, "anomaly", runner=FakeRunner())
    assert all_node_ids(scene) == before and sh_item_count(scene) == items


def test_real_task_in_process_with_a_tiny_model(app, ct, tiny_model_dir):
    """runner=None: the real MedDiffFMLib.tasks.run_task, in this process, on the tiny model."""
    node, array, m, study = ct
    mtime = node.GetImageData().GetMTime()
    out = nodes.process(node, "denoise", params={"steps": 1, "seed": 0}, region="chest", model=tiny_model_dir,
                        device="cpu")
    assert set(out) == {"denoised"}
    denoised = out["denoised"]
    assert denoised.GetName() == NODE_NAMES["denoised"]
    assert np.array_equal(node_matrix(denoised), m)
    assert node_array(denoised).shape == SHAPE and np.isfinite(node_array(denoised)).all()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(denoised)) == study
    assert_untouched(node, array, m, mtime)
