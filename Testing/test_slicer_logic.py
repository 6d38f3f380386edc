"""The module's node-level logic against a real MRML scene (``slicer-core`` wheel, no Slicer app).

The scene is stood up as Slicer's application (and trame-slicer) does it: a
vtkSlicerApplicationLogic with the default colour nodes, and the volumes, segmentations,
and subject hierarchy logics registered (``MedDiffFMSlicer.headless``).

Tasks are test doubles here (a runner with run_task's signature).
TODO(lead): add one case with ``runner=None`` (the real in-process run_task) and a tiny model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core vtk==9.6.0)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "MedDiffFM"))

from vtkmodules.util import numpy_support  # noqa: E402
from vtkmodules.vtkCommonDataModel import vtkImageData  # noqa: E402

from MedDiffFMLib.tasks.base import Cancelled, TaskResult  # noqa: E402
from MedDiffFMLib.volume import Volume  # noqa: E402
from MedDiffFMSlicer import nodes  # noqa: E402
from MedDiffFMSlicer.headless import create_scene  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Helpers that build nodes with plain VTK calls (not with the code under test)


def oblique_matrix(spacing=(0.7, 0.9, 2.5), origin=(-12.25, 20.5, 7.125)) -> np.ndarray:
    """IJK->RAS with a rotation about a skewed axis and anisotropic spacing (i, j, k)."""
    a, b, c = np.radians([12.0, -25.0, 33.0])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def vtk_matrix(a):
    return nodes.numpy_to_matrix(a)


def add_volume(scene, array, ijk_to_ras, name="CT", cls="vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(cls, name)
    image = vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True))
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    node.CreateDefaultDisplayNodes()
    return node


def add_segment(seg_node, mask_kji, ijk_to_ras, name, segment_id=""):
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(mask_kji.shape[2], mask_kji.shape[1], mask_kji.shape[0])
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(mask_kji.astype(np.uint8)).ravel(), deep=True))
    image.SetImageToWorldMatrix(vtk_matrix(ijk_to_ras))
    return seg_node.AddSegmentFromBinaryLabelmapRepresentation(image, name, [1.0, 0.0, 0.0], segment_id)


def node_array(node):
    image = node.GetImageData()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])


def node_matrix(node):
    return nodes.ijk_to_ras_of(node)


def all_node_ids(scene):
    return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}


def sh_item_count(scene):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    from vtkmodules.vtkCommonCore import vtkIdList

    ids = vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return ids.GetNumberOfIds()


SHAPE = (9, 12, 14)  # k, j, i


@pytest.fixture(scope="module")
def app():
    return create_scene()


@pytest.fixture()
def ct(app):
    """An oblique, anisotropic int16 CT in a patient/study folder of the subject hierarchy."""
    scene = app.scene
    rng = np.random.default_rng(7)
    array = rng.integers(-1000, 1500, SHAPE).astype(np.int16)
    m = oblique_matrix()
    node = add_volume(scene, array, m, "CT")
    node.GetDisplayNode().SetAutoWindowLevel(False)
    node.GetDisplayNode().SetWindowLevel(400, 40)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "Study 1")
    sh.CreateItem(study, node)
    node.SetAttribute("kept", "yes")
    yield node, array, m, study
    # tests add nodes; leave the module-scoped scene tidy for the next one
    for cls in ("vtkMRMLVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLTransformNode"):
        for n in [scene.GetNthNodeByClass(i, cls) for i in range(scene.GetNumberOfNodesByClass(cls))]:
            nodes.remove_node(n)
    sh.RemoveItem(patient, False, True)


def assert_untouched(node, array, m, mtime):
    assert np.array_equal(node_array(node), array)
    assert node_array(node).dtype == np.int16
    assert np.array_equal(node_matrix(node), m)
    assert node.GetImageData().GetMTime() == mtime
    assert node.GetName() == "CT" and node.GetAttribute("kept") == "yes"


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
    back = nodes.new_volume_node(node.GetScene(), nodes.volume_from_node(node), "copy")
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


# ---------------------------------------------------------------------------------------------
# Results


class FakeRunner:
    """run_task's signature; returns outputs on the input grid (or a finer grid for superres)."""

    def __init__(self, fail=None):
        self.fail = fail
        self.calls = []

    def __call__(self, task, request, model=None, *, controlnet=None, device="auto", progress=None, cancel=None):
        self.calls.append((task, request, model, controlnet, device))
        if self.fail is not None:
            raise self.fail
        img = request.image
        if task == "superres":
            m = img.ijk_to_ras.copy()
            m[:3, 2] /= 2  # half the slice spacing
            m[:3, 3] -= img.ijk_to_ras[:3, 2] / 4  # keep the slab's extent
            arr = np.repeat(img.array, 2, axis=0) + 0.5
            return TaskResult(volumes={"superres": Volume(arr.astype(np.float32), m)}, summary="sr")
        if task == "anomaly":
            amap = np.abs(img.array - img.array.mean()).astype(np.float32) / 100
            seg = amap > np.percentile(amap, 90)
            return TaskResult(volumes={"anomaly_map": Volume(amap, img.ijk_to_ras),
                                       "reconstruction": Volume(img.array * 0 + 40, img.ijk_to_ras)},
                              segmentations={"anomaly": Volume(seg, img.ijk_to_ras)},
                              scores={"anomaly_score": 0.73}, summary="anomaly done")
        if task == "lesion":
            return TaskResult(volumes={"lesion": Volume(img.array + 1, img.ijk_to_ras)},
                              segmentations={"lesion": Volume(request.mask.array.copy(), img.ijk_to_ras)})
        segs = {}
        if task in nodes.PRIMARY_SEGMENTATION:
            segs[nodes.PRIMARY_SEGMENTATION[task]] = Volume(request.mask.array.copy(), img.ijk_to_ras)
        return TaskResult(volumes={nodes.PRIMARY_VOLUME[task]: Volume(img.array - 1, img.ijk_to_ras)},
                          segmentations=segs)


def test_anomaly_result_nodes(app, ct):
    node, array, m, study = ct
    mtime = node.GetImageData().GetMTime()
    transform = app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    node.SetAndObserveTransformNodeID(transform.GetID())
    runner = FakeRunner()
    out = nodes.process(node, "anomaly", runner=runner, params={"steps": 4}, model="tiny", device="cpu")
    assert runner.calls[0][2] == "tiny" and runner.calls[0][4] == "cpu"
    assert set(out) == {"anomaly_map", "reconstruction", "anomaly_segmentation"}
    amap, recon, seg = out["anomaly_map"], out["reconstruction"], out["anomaly_segmentation"]
    assert amap.GetName() == "CT anomaly map" and recon.GetName() == "CT anomaly reconstruction"
    assert seg.GetName() == "CT anomaly segmentation"
    for n in (amap, recon):
        assert np.array_equal(node_matrix(n), m)
        assert node_array(n).dtype == np.float32
    # heat colour map on the anomaly map; the reconstruction keeps the input's window/level
    assert amap.GetDisplayNode().GetColorNodeID() == nodes.heat_color_node_id(app.scene)
    assert amap.GetDisplayNode().GetColorNodeID() in nodes.HEAT_COLOR_NODE_IDS
    assert recon.GetDisplayNode().GetWindow() == pytest.approx(400)
    # the segmentation matches the mask, read back onto the input grid
    expected = runner.calls[0][1].image.array
    expected = np.abs(expected - expected.mean()) / 100
    expected = expected > np.percentile(expected, 90)
    sid = seg.GetSegmentation().GetNthSegmentID(0)
    assert seg.GetSegmentation().GetSegment(sid).GetName() == "anomaly"
    assert np.array_equal(nodes.mask_from_segment(seg, sid, node).array, expected)
    # placed in the input's study, under the input's transform, tagged with the scores
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    for n in out.values():
        assert sh.GetItemParent(sh.GetItemByDataNode(n)) == study
        assert n.GetTransformNodeID() == transform.GetID()
        assert n.GetAttribute("MedDiffFM.task") == "anomaly"
        assert float(n.GetAttribute("MedDiffFM.score.anomaly_score")) == pytest.approx(0.73)
    assert_untouched(node, array, m, mtime)


def test_superres_output_has_the_new_grid(app, ct):
    node, array, m, study = ct
    mtime = node.GetImageData().GetMTime()
    out = nodes.process(node, "superres", runner=FakeRunner())
    sr = out["superres"]
    expected = m.copy()
    expected[:3, 2] /= 2
    expected[:3, 3] -= m[:3, 2] / 4
    assert np.array_equal(node_matrix(sr), expected)
    assert node_array(sr).shape == (2 * SHAPE[0], SHAPE[1], SHAPE[2])
    assert np.array_equal(node_array(sr), np.repeat(array.astype(np.float32), 2, axis=0) + 0.5)
    assert sr.GetName() == "CT super-resolution"
    assert_untouched(node, array, m, mtime)


def test_lesion_needs_a_mask_and_writes_existing_outputs(app, ct):
    node, array, m, _ = ct
    scene = app.scene
    with pytest.raises(ValueError, match="mask"):
        nodes.process(node, "lesion", runner=FakeRunner())
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Drawn")
    box = np.zeros(SHAPE, bool)
    box[3:5, 4:7, 5:9] = True
    add_segment(seg, box, m, "where")
    out_vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "my output")
    out_seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my lesion")
    before = all_node_ids(scene)
    runner = FakeRunner()
    out = nodes.process(node, "lesion", runner=runner, mask_segmentation=seg, output_volume=out_vol,
                        output_segmentation=out_seg)
    assert out["lesion"] is out_vol and out["lesion_segmentation"] is out_seg
    assert out_vol.GetName() == "my output"
    assert np.array_equal(node_array(out_vol), array.astype(np.float32) + 1)
    assert np.array_equal(node_matrix(out_vol), m)
    assert np.array_equal(runner.calls[0][1].mask.array, box)
    sid = out_seg.GetSegmentation().GetNthSegmentID(0)
    assert np.array_equal(nodes.mask_from_segment(out_seg, sid, node).array, box)
    new = all_node_ids(scene) - before
    assert all(not scene.GetNodeByID(i).IsA("vtkMRMLVolumeNode") for i in new)  # no extra volumes
    with pytest.raises(ValueError, match="must not be the input"):
        nodes.process(node, "denoise", runner=FakeRunner(), output_volume=node)


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

    def broken(volume_node):
        raise RuntimeError("display failed")

    monkeypatch.setattr(nodes, "show_as_heat_map", broken)
    with pytest.raises(RuntimeError, match="display failed"):
        nodes.process(node, "anomaly", runner=FakeRunner())
    assert all_node_ids(scene) == before and sh_item_count(scene) == items


def test_every_task_makes_its_primary_output(app, ct):
    node, array, m, _ = ct
    seg = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Drawn")
    box = np.zeros(SHAPE, bool)
    box[2:4, 2:4, 2:4] = True
    add_segment(seg, box, m, "where")
    for task in nodes.TASKS:
        kwargs = {"mask_segmentation": seg} if task in nodes.MASK_TASKS else {}
        out = nodes.process(node, task, runner=FakeRunner(), **kwargs)
        assert nodes.PRIMARY_VOLUME[task] in out, task
        if task in nodes.PRIMARY_SEGMENTATION:
            assert nodes.PRIMARY_SEGMENTATION[task] + "_segmentation" in out


def test_real_task_in_process_with_a_tiny_model(app, ct, tiny_model_dir):
    """runner=None: the real MedDiffFMLib.tasks.run_task, in this process, on the tiny model."""
    node, array, m, study = ct
    mtime = node.GetImageData().GetMTime()
    out = nodes.process(node, "denoise", params={"steps": 1, "seed": 0}, region="chest", model=tiny_model_dir,
                        device="cpu")
    denoised = out["denoised"]
    assert np.array_equal(node_matrix(denoised), m)
    assert node_array(denoised).shape == SHAPE and np.isfinite(node_array(denoised)).all()
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(app.scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(denoised)) == study
    assert_untouched(node, array, m, mtime)
