"""Helpers for the tests on real MRML (``slicer-core`` wheel): a scene set up as Slicer's
application does it, and nodes built with plain VTK calls (not with the code under test).

Importing this module skips the importing test module when slicer-core is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core vtk==9.6.0)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed 'slicer' package is not slicer-core", allow_module_level=True)

MODULE_DIR = Path(__file__).resolve().parent.parent / "MedDiffFM"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))

from vtkmodules.util import numpy_support  # noqa: E402
from vtkmodules.vtkCommonCore import vtkIdList  # noqa: E402
from vtkmodules.vtkCommonDataModel import vtkImageData  # noqa: E402
from vtkmodules.vtkCommonMath import vtkMatrix4x4  # noqa: E402

SHAPE = (9, 12, 14)  # k, j, i


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


def vtk_matrix(a) -> vtkMatrix4x4:
    m = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


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


def node_matrix(node) -> np.ndarray:
    m = vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def all_node_ids(scene) -> set:
    return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}


def sh_item_count(scene) -> int:
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    ids = vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return ids.GetNumberOfIds()


@pytest.fixture(scope="module")
def app():
    from MedDiffFMSlicer.headless import create_scene

    return create_scene()


@pytest.fixture()
def ct(app):
    """An oblique, anisotropic int16 CT in a patient/study folder of the subject hierarchy."""
    from MedDiffFMSlicer.outputs import remove_node

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
            remove_node(n)
    sh.RemoveItem(patient, False, True)


def assert_untouched(node, array, m, mtime) -> None:
    assert np.array_equal(node_array(node), array)
    assert node_array(node).dtype == np.int16
    assert np.array_equal(node_matrix(node), m)
    assert node.GetImageData().GetMTime() == mtime
    assert node.GetName() == "CT" and node.GetAttribute("kept") == "yes"
