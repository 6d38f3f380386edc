"""MRML nodes <-> MedDiffFMLib: everything the module does to the scene, without Qt.

Needs only MRML (the Slicer application or the ``slicer-core`` wheel), VTK and the library, so
it is tested outside Slicer against a real MRML scene. It never uses ``slicer.app``,
``slicer.mrmlScene`` or ``slicer.modules``: the scene is always the input node's scene.

Rules kept here:

* the input volume node is only read (its voxels are copied; nothing is written to it);
* a mask or anatomy segmentation is resampled onto the input volume's voxel grid (parent
  transforms of both nodes are taken into account);
* result volumes keep the input's geometry (super-resolution: the new grid), get the input's
  parent transform and are placed beside the input in the subject hierarchy (its study);
* nothing is created when the task fails or is cancelled; on an error while adding nodes,
  those already added are removed again.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping, Optional

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkIntArray, vtkStringArray
from vtkmodules.vtkCommonMath import vtkMatrix4x4
from vtkmodules.vtkCommonDataModel import vtkImageData

from MedDiffFMLib.tasks.base import TaskRequest, TaskResult
from MedDiffFMLib.volume import Volume

TASKS = ("denoise", "anomaly", "synthesize", "superres", "lesion", "inpaint")
REGIONS = ("auto", "head_neck", "chest", "abdomen")

# The output each task's "output volume" / "output segmentation" selector refers to.
PRIMARY_VOLUME = {"denoise": "denoised", "anomaly": "anomaly_map", "synthesize": "synthetic",
                  "superres": "superres", "lesion": "lesion", "inpaint": "inpainted"}
PRIMARY_SEGMENTATION = {"anomaly": "anomaly", "lesion": "lesion", "inpaint": "inpainted_region"}
# Tasks that need a mask segment (every task accepts an optional anatomy segmentation).
MASK_TASKS = ("lesion", "inpaint")

OUTPUT_LABELS = {"denoised": "denoised", "anomaly_map": "anomaly map", "reconstruction": "anomaly reconstruction",
                 "synthetic": "synthetic", "superres": "super-resolution", "lesion": "lesion",
                 "inpainted": "inpainted", "anomaly": "anomaly", "inpainted_region": "inpainted region"}
SEGMENT_COLORS = {"anomaly": (1.0, 0.15, 0.1), "lesion": (0.95, 0.75, 0.1), "inpainted_region": (0.3, 0.8, 0.3)}
# Colour maps for the anomaly map, best first (the file-based ones exist in the Slicer application).
HEAT_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
                       "vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeIron")
ATTRIBUTE_PREFIX = "MedDiffFM."

Runner = Callable[..., TaskResult]


# ---------------------------------------------------------------------------------------------
# Matrices and arrays


def matrix_to_numpy(m: vtkMatrix4x4) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def numpy_to_matrix(a: np.ndarray) -> vtkMatrix4x4:
    m = vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def _image_to_array(image: vtkImageData) -> np.ndarray:
    """(k, j, i) copy of a single-component vtkImageData."""
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise ValueError("the volume has no voxels")
    if scalars.GetNumberOfComponents() != 1:
        raise ValueError(f"the volume has {scalars.GetNumberOfComponents()} components per voxel; "
                         "a scalar (grey-level) CT volume is needed")
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]).copy()


def _array_to_image(array: np.ndarray) -> vtkImageData:
    arr = np.asarray(array)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    arr = np.ascontiguousarray(arr)
    image = vtkImageData()
    image.SetDimensions(int(arr.shape[2]), int(arr.shape[1]), int(arr.shape[0]))
    vtk_arr = numpy_support.numpy_to_vtk(arr.ravel(), deep=True)
    image.GetPointData().SetScalars(vtk_arr)
    return image


def ijk_to_ras_of(volume_node) -> np.ndarray:
    m = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    return matrix_to_numpy(m)


# ---------------------------------------------------------------------------------------------
# Inputs


def volume_from_node(volume_node) -> Volume:
    """A scalar volume node -> Volume (float32 HU, Slicer's (k, j, i) order and IJK->RAS)."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("select an input volume that has image data")
    array = _image_to_array(volume_node.GetImageData()).astype(np.float32, copy=False)
    return Volume(array, ijk_to_ras_of(volume_node))


def _reference_extent_dims(reference_volume_node) -> tuple[int, int, int]:
    dims = reference_volume_node.GetImageData().GetDimensions()
    return int(dims[2]), int(dims[1]), int(dims[0])


def _merged_labelmap(segmentation_node, segment_ids: list[str], reference_volume_node,
                     label_values: Optional[list[int]] = None) -> np.ndarray:
    """Segments -> (k, j, i) label array on the reference volume's voxel grid."""
    ids = vtkStringArray()
    for sid in segment_ids:
        ids.InsertNextValue(sid)
    values = None
    if label_values is not None:
        values = vtkIntArray()
        for v in label_values:
            values.InsertNextValue(int(v))
    merged = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
        segmentation_node, reference_volume_node, ids, 0, merged, values)  # 0: EXTENT_REFERENCE_GEOMETRY
    shape = _reference_extent_dims(reference_volume_node)
    out = np.zeros(shape, dtype=np.int16)
    if merged.GetPointData().GetScalars() is None:
        return out
    ext = merged.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return out
    data = numpy_support.vtk_to_numpy(merged.GetPointData().GetScalars()).reshape(
        ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    # Copy the part of the merged extent that lies inside the reference grid.
    lo = (ext[4], ext[2], ext[0])
    src, dst = [], []
    for axis in range(3):
        a0 = max(lo[axis], 0)
        a1 = min(lo[axis] + data.shape[axis], shape[axis])
        if a1 <= a0:
            return out
        src.append(slice(a0 - lo[axis], a1 - lo[axis]))
        dst.append(slice(a0, a1))
    out[tuple(dst)] = data[tuple(src)]
    return out


def mask_from_segment(segmentation_node, segment_id: str, reference_volume_node) -> Volume:
    """One segment -> boolean mask on the reference volume's grid (nearest neighbour)."""
    if segmentation_node is None:
        raise ValueError("select a mask segmentation")
    segmentation = segmentation_node.GetSegmentation()
    if not segment_id or segmentation.GetSegment(segment_id) is None:
        raise ValueError(f"segment {segment_id!r} is not in {segmentation_node.GetName()}")
    labels = _merged_labelmap(segmentation_node, [segment_id], reference_volume_node, [1])
    return Volume(labels > 0, ijk_to_ras_of(reference_volume_node))


def _known_class_names() -> Optional[set[str]]:
    try:
        from MedDiffFMLib.anatomy import TOTALSEGMENTATOR_V2  # imports torch: optional here
    except Exception:
        return None
    return set(TOTALSEGMENTATOR_V2.values())


def segment_class_name(segment_id: str, segment_name: str, known: Optional[set[str]] = None) -> str:
    """The anatomy class of a segment: its name, or its ID when that is a TotalSegmentator class
    (SlicerTotalSegmentator keeps the class as segment ID and may show a standard name)."""
    normalized = re.sub(r"[\s\-]+", "_", (segment_name or "").strip().lower())
    if known:
        for candidate in (segment_name, normalized, segment_id):
            if candidate in known:
                return candidate
    return normalized or segment_id


def labelmap_from_segmentation(segmentation_node, reference_volume_node,
                               segment_ids: Optional[list[str]] = None) -> tuple[Volume, dict[int, str]]:
    """All (or the given) segments -> integer label map on the reference grid + label -> class name."""
    segmentation = segmentation_node.GetSegmentation()
    if segment_ids is None:
        segment_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    if not segment_ids:
        raise ValueError(f"the anatomy segmentation {segmentation_node.GetName()} has no segments")
    known = _known_class_names()
    names = {n + 1: segment_class_name(sid, segmentation.GetSegment(sid).GetName(), known)
             for n, sid in enumerate(segment_ids)}
    labels = _merged_labelmap(segmentation_node, segment_ids, reference_volume_node, list(names))
    return Volume(labels, ijk_to_ras_of(reference_volume_node)), names


def build_request(input_volume_node, *, params: Optional[Mapping[str, Any]] = None, region: Optional[str] = None,
                  anatomy_segmentation=None, mask_segmentation=None, mask_segment_id: Optional[str] = None
                  ) -> TaskRequest:
    """Read the nodes into a TaskRequest (all on the input volume's grid)."""
    image = volume_from_node(input_volume_node)
    anatomy = names = mask = None
    if anatomy_segmentation is not None:
        anatomy, names = labelmap_from_segmentation(anatomy_segmentation, input_volume_node)
    if mask_segmentation is not None:
        if not mask_segment_id:
            segmentation = mask_segmentation.GetSegmentation()
            if segmentation.GetNumberOfSegments() == 0:
                raise ValueError(f"the mask segmentation {mask_segmentation.GetName()} has no segments; draw one")
            mask_segment_id = segmentation.GetNthSegmentID(0)
        mask = mask_from_segment(mask_segmentation, mask_segment_id, input_volume_node)
    return TaskRequest(image=image, region=None if region in (None, "", "auto") else region, anatomy=anatomy,
                       anatomy_names=names, mask=mask, params=dict(params or {}))


# ---------------------------------------------------------------------------------------------
# Outputs


def update_volume_node(volume_node, volume: Volume) -> None:
    """Replace a volume node's voxels and geometry (float32 images, uint8 masks)."""
    array = np.asarray(volume.array)
    if array.dtype != bool and array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    volume_node.SetIJKToRASMatrix(numpy_to_matrix(volume.ijk_to_ras))
    volume_node.SetAndObserveImageData(_array_to_image(array))
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


def heat_color_node_id(scene) -> Optional[str]:
    for node_id in HEAT_COLOR_NODE_IDS:
        if scene.GetNodeByID(node_id) is not None:
            return node_id
    return None


def show_as_heat_map(volume_node) -> None:
    """Anomaly map display: a heat colour map from 0 to the 99.5th percentile."""
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    color_id = heat_color_node_id(volume_node.GetScene())
    if color_id is not None:
        display.SetAndObserveColorNodeID(color_id)
    values = _image_to_array(volume_node.GetImageData()).ravel()
    values = values[:: max(1, values.size // 2_000_000)]  # a percentile needs no more samples
    top = float(np.percentile(values, 99.5)) if values.size else 1.0
    low = float(min(0.0, values.min())) if values.size else 0.0
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(low, max(top, low + 1e-6))


def subject_hierarchy_parent(node) -> int:
    """The subject hierarchy folder (normally the study) holding ``node``; the scene if none."""
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


def new_segmentation_node(scene, masks: Mapping[str, Volume], name: str, reference_volume_node=None):
    """A segmentation node with one segment per mask (binary labelmaps on the masks' grids)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", _unique_name(scene, name))
    node.CreateDefaultDisplayNodes()
    fill_segmentation_node(node, masks, reference_volume_node)
    return node


def fill_segmentation_node(node, masks: Mapping[str, Volume], reference_volume_node=None) -> None:
    """Replace a segmentation node's segments by ``masks``."""
    if reference_volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    segmentation = node.GetSegmentation()
    segmentation.RemoveAllSegments()
    for seg_name, mask in masks.items():
        image = slicer.vtkOrientedImageData()
        image.ShallowCopy(_array_to_image(np.asarray(mask.array) > 0))
        image.SetImageToWorldMatrix(numpy_to_matrix(mask.ijk_to_ras))
        color = SEGMENT_COLORS.get(seg_name, (0.2, 0.6, 1.0))
        sid = node.AddSegmentFromBinaryLabelmapRepresentation(image, OUTPUT_LABELS.get(seg_name, seg_name), color)
        if not sid:
            raise RuntimeError(f"could not add segment {seg_name!r}")


def output_name(input_node, task: str, key: str) -> str:
    label = OUTPUT_LABELS.get(key, f"{task} {key.replace('_', ' ')}")
    return f"{input_node.GetName()} {label}"


def _tag(node, task: str, result: TaskResult, params: Mapping[str, Any], key: str) -> None:
    node.SetAttribute(ATTRIBUTE_PREFIX + "task", task)
    node.SetAttribute(ATTRIBUTE_PREFIX + "output", key)
    node.SetAttribute(ATTRIBUTE_PREFIX + "parameters", json.dumps(params, sort_keys=True, default=str))
    if result.summary:
        node.SetAttribute(ATTRIBUTE_PREFIX + "summary", result.summary)
    for name, value in (result.scores or {}).items():
        node.SetAttribute(ATTRIBUTE_PREFIX + "score." + name, repr(float(value)))


def result_to_nodes(result: TaskResult, input_volume_node, task: str, *, params: Optional[Mapping[str, Any]] = None,
                    output_volume=None, output_segmentation=None) -> dict[str, Any]:
    """Add a TaskResult to the scene, next to the input. Returns {output name: node}.

    ``output_volume`` / ``output_segmentation``: existing nodes to overwrite with the task's
    primary outputs (see :data:`PRIMARY_VOLUME`, :data:`PRIMARY_SEGMENTATION`); None makes new
    nodes named after the input and the output. Never writes into the input node. Segmentation
    nodes are returned under ``"<name>_segmentation"`` (e.g. ``"anomaly_segmentation"``).
    """
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
            if output_volume is not None and key == PRIMARY_VOLUME.get(task):
                node = output_volume
                deferred.append(lambda n=node, v=vol: update_volume_node(n, v))
                if node.GetDisplayNode() is None:
                    node.CreateDefaultDisplayNodes()
            else:
                node = new_volume_node(scene, vol, output_name(input_volume_node, task, key))
                created.append(node)
            nodes[key] = node
        for key, mask in result.segmentations.items():
            if output_segmentation is not None and key == PRIMARY_SEGMENTATION.get(task):
                node = output_segmentation
                deferred.append(lambda n=node, m={key: mask}: fill_segmentation_node(n, m, input_volume_node))
            else:
                node = new_segmentation_node(scene, {key: mask},
                                             output_name(input_volume_node, task, key) + " segmentation",
                                             input_volume_node)
                created.append(node)
            nodes[key + "_segmentation"] = node
        for update in deferred:  # existing nodes change last, once everything else worked
            update()
        for key, node in nodes.items():
            node.SetAndObserveTransformNodeID(transform_id)
            if node.IsA("vtkMRMLScalarVolumeNode"):
                if key == "anomaly_map":
                    show_as_heat_map(node)
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


# ---------------------------------------------------------------------------------------------
# The whole round trip


def default_runner() -> Runner:
    """In-process :func:`MedDiffFMLib.tasks.run_task` (imports torch)."""
    from MedDiffFMLib.tasks import run_task

    return run_task


def process(input_volume_node, task: str = "denoise", *, runner: Optional[Runner] = None,
            params: Optional[Mapping[str, Any]] = None, region: Optional[str] = None, anatomy_segmentation=None,
            mask_segmentation=None, mask_segment_id: Optional[str] = None, model=None, controlnet=None,
            device: str = "auto", progress=None, cancel=None, output_volume=None, output_segmentation=None
            ) -> dict[str, Any]:
    """Nodes in, task, nodes out. ``runner`` has :func:`MedDiffFMLib.tasks.run_task`'s signature
    (the Slicer module passes a worker-process runner). Nothing is added to the scene when the
    runner raises (including ``Cancelled``)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task in MASK_TASKS and mask_segmentation is None:
        raise ValueError(f"the {task} task needs a mask: select a segmentation and segment (draw one first)")
    request = build_request(input_volume_node, params=params, region=region,
                            anatomy_segmentation=anatomy_segmentation, mask_segmentation=mask_segmentation,
                            mask_segment_id=mask_segment_id)
    run = runner or default_runner()
    result = run(task, request, model, controlnet=controlnet, device=device, progress=progress, cancel=cancel)
    return result_to_nodes(result, input_volume_node, task, params=request.params, output_volume=output_volume,
                           output_segmentation=output_segmentation)
