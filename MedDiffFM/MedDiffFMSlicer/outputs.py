"""MedDiffFMLib results -> new (or updated) MRML nodes beside the input. MRML only, no Qt.

Rules kept here:

* result volumes keep the input's geometry (super-resolution: its own, finer grid), get the
  input's parent transform and are placed beside the input in the subject hierarchy (its study);
* node names and segment terms come from the task registry (:mod:`MedDiffFMLib.tasks.registry`)
  and :mod:`.display`;
* nothing is created when the task fails or is cancelled; on an error while adding nodes,
  those already added are removed again; existing output nodes change only once all else worked;
* the input node is never written.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Optional

import numpy as np
import slicer

from MedDiffFMLib.tasks.base import TaskResult
from MedDiffFMLib.tasks.registry import task_spec
from MedDiffFMLib.volume import Volume

from . import display
from .nodes import array_to_image, numpy_to_matrix

ATTRIBUTE_PREFIX = "MedDiffFM."
PLAIN_SEGMENT_RGB = (51, 153, 255)


def update_volume_node(volume_node, volume: Volume) -> None:
    """Replace a volume node's voxels and geometry (float32 images, uint8 masks)."""
    array = np.asarray(volume.array)
    if array.dtype != bool and array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    volume_node.SetIJKToRASMatrix(numpy_to_matrix(volume.ijk_to_ras))
    volume_node.SetAndObserveImageData(array_to_image(array))
    volume_node.Modified()


def _unique_name(scene, name: str) -> str:
    return scene.GenerateUniqueName(name) if scene.GetFirstNodeByName(name) is not None else name


def new_volume_node(scene, volume: Volume, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", _unique_name(scene, name))
    update_volume_node(node, volume)
    node.CreateDefaultDisplayNodes()
    return node


def _copy_window_level(source_node, target_node) -> None:
    src, dst = source_node.GetDisplayNode(), target_node.GetDisplayNode()
    if src is None or dst is None:
        return
    dst.SetAutoWindowLevel(False)
    dst.SetWindowLevel(src.GetWindow(), src.GetLevel())
    if src.GetColorNodeID():
        dst.SetAndObserveColorNodeID(src.GetColorNodeID())


def subject_hierarchy_parent(node) -> int:
    """The subject hierarchy folder (study) that holds ``node``, or the scene."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    item = sh.GetItemByDataNode(node)
    if item:
        parent = sh.GetItemParent(item)
        if parent:
            return parent
    return sh.GetSceneItemID()


def place_beside(node, reference_node) -> int:
    """Put ``node`` in the same subject hierarchy folder (study) as ``reference_node``."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    parent = subject_hierarchy_parent(reference_node)
    item = sh.GetItemByDataNode(node)
    if not item:  # without the application's plugins, items are not made automatically
        item = sh.CreateItem(parent, node)
    else:
        sh.SetItemParent(item, parent)
    return item


def fill_segmentation_node(node, masks: Mapping[str, Volume], terms: Mapping[str, Optional[display.SegmentTerm]],
                           reference_volume_node=None) -> None:
    """Replace a segmentation node's segments by ``masks`` (binary labelmaps on the masks' grids),
    each named and coloured by its terminology entry where it has one."""
    if reference_volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    for key, mask in masks.items():
        image = slicer.vtkOrientedImageData()
        image.ShallowCopy(array_to_image(np.asarray(mask.array) > 0))
        image.SetImageToWorldMatrix(numpy_to_matrix(mask.ijk_to_ras))
        term = terms.get(key)
        sid = node.AddSegmentFromBinaryLabelmapRepresentation(
            image, key, [c / 255.0 for c in (term.rgb if term else PLAIN_SEGMENT_RGB)])
        if not sid:
            raise RuntimeError(f"could not add segment {key!r}")
        if term is not None:
            display.set_segment_terminology(segmentation.GetSegment(sid), term)


def new_segmentation_node(scene, masks: Mapping[str, Volume], terms, name: str, reference_volume_node=None):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", _unique_name(scene, name))
    node.CreateDefaultDisplayNodes()
    fill_segmentation_node(node, masks, terms, reference_volume_node)
    return node


def output_label(task: str, key: str, kind: str) -> str:
    """The registry's words for an output (an output the registry does not list: its name)."""
    try:
        return task_spec(task).output(key, kind).label
    except KeyError:
        return key.replace("_", " ")


def output_name(input_node, task: str, key: str, kind: str = "volume") -> str:
    name = f"{input_node.GetName()} {output_label(task, key, kind)}"
    return name + " segmentation" if kind == "segmentation" else name


def _tag(node, task: str, result: TaskResult, params: Mapping[str, Any], key: str) -> None:
    node.SetAttribute(ATTRIBUTE_PREFIX + "task", task)
    node.SetAttribute(ATTRIBUTE_PREFIX + "output", key)
    node.SetAttribute(ATTRIBUTE_PREFIX + "parameters", json.dumps(params, sort_keys=True, default=str))
    if result.summary:
        node.SetAttribute(ATTRIBUTE_PREFIX + "summary", result.summary)
    for name, value in (result.scores or {}).items():
        node.SetAttribute(ATTRIBUTE_PREFIX + "score." + name, repr(float(value)))


def anomaly_threshold(params: Mapping[str, Any]) -> float:
    """The threshold the anomaly run used (its parameter, else the registry default)."""
    return float(params.get("threshold", task_spec("anomaly").params["threshold"].default))


def result_to_nodes(result: TaskResult, input_volume_node, task: str, *, params: Optional[Mapping[str, Any]] = None,
                    output_volume=None, output_segmentation=None) -> dict[str, Any]:
    """Add a TaskResult to the scene, next to the input. Returns {output name: node}.

    ``output_volume`` / ``output_segmentation``: existing nodes to overwrite with the task's
    primary outputs (the registry's ``primary_volume`` / ``primary_segmentation``); None makes
    new nodes named after the input and the output. Never writes into the input node.
    Segmentation nodes are returned under ``"<name>_segmentation"`` (e.g. ``"anomaly_segmentation"``).
    """
    spec = task_spec(task)
    scene = input_volume_node.GetScene()
    params = dict(params or {})
    for node in (output_volume, output_segmentation):
        if node is not None and node is input_volume_node:
            raise ValueError("the output must not be the input volume; choose 'Create new' or another node")
    transform_id = input_volume_node.GetTransformNodeID()
    created: list = []
    nodes: dict[str, Any] = {}
    deferred: list[Callable[[], None]] = []
    try:
        for key, vol in result.volumes.items():
            if output_volume is not None and key == spec.primary_volume:
                node = output_volume
                deferred.append(lambda n=node, v=vol: update_volume_node(n, v))
                if node.GetDisplayNode() is None:
                    node.CreateDefaultDisplayNodes()
            else:
                node = new_volume_node(scene, vol, output_name(input_volume_node, task, key))
                created.append(node)
            nodes[key] = node
        for key, mask in result.segmentations.items():
            terms = {key: display.segment_term(task, key, params)}
            if output_segmentation is not None and key == spec.primary_segmentation:
                node = output_segmentation
                deferred.append(lambda n=node, m={key: mask}, t=terms: fill_segmentation_node(n, m, t,
                                                                                              input_volume_node))
            else:
                node = new_segmentation_node(scene, {key: mask}, terms,
                                             output_name(input_volume_node, task, key, "segmentation"),
                                             input_volume_node)
                created.append(node)
            nodes[key + "_segmentation"] = node
        for update in deferred:  # existing nodes change last, once everything else worked
            update()
        for key, node in nodes.items():
            node.SetAndObserveTransformNodeID(transform_id)
            if node.IsA("vtkMRMLScalarVolumeNode"):
                if task == "anomaly" and key == "anomaly_map":
                    display.show_anomaly_map(node, anomaly_threshold(params))
                else:
                    _copy_window_level(input_volume_node, node)
            _tag(node, task, result, params, key)
            place_beside(node, input_volume_node)
    except BaseException:
        for node in created:
            remove_node(node)
        raise
    return nodes


def remove_node(node) -> None:
    """Remove a node with its display and storage nodes and its subject hierarchy item (the
    Slicer application does the last two itself; a headless scene does not)."""
    scene = node.GetScene()
    if scene is None:
        return
    extras = [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())] \
        if hasattr(node, "GetNumberOfDisplayNodes") else []
    if hasattr(node, "GetStorageNode"):
        extras.append(node.GetStorageNode())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(node) if sh is not None else 0
    if item:
        sh.RemoveItem(item, False, False)
    scene.RemoveNode(node)
    for extra in extras:
        if extra is not None and extra.GetScene() is not None:
            scene.RemoveNode(extra)
