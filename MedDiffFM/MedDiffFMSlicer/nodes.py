"""MRML nodes -> MedDiffFMLib requests, and the one run path (nodes in, task, nodes out).

Needs only MRML (the Slicer application or the ``slicer-core`` wheel), VTK and the library, so
it is tested outside Slicer against a real MRML scene. It never uses ``slicer.app``,
``slicer.mrmlScene`` or ``slicer.modules``: the scene is always the input node's scene.

Rules kept here:

* the input volume node is only read (its voxels are copied; nothing is written to it);
* a mask or anatomy segmentation is resampled onto the input volume's voxel grid (parent
  transforms of both nodes are taken into account); a segmentation stored only as closed
  surfaces gets its binary-labelmap representation first, as Slicer's own export does;
* bad input (unknown task, missing mask, a parameter out of range) is refused with one line
  before any work; results go to the scene through :mod:`.outputs`.

The run path: :func:`prepare_request` -> a runner with ``run_task``'s signature -> 
:func:`.outputs.result_to_nodes`. :func:`process` does the three in a row (blocking; the module
passes :class:`MedDiffFMLib.worker.WorkerRunner`, tests and batch scripts may pass
``run_task`` itself); :class:`.run.Job` does the same three steps polled from a GUI timer.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import vtkIntArray, vtkStringArray
from vtkmodules.vtkCommonMath import vtkMatrix4x4
from vtkmodules.vtkCommonDataModel import vtkImageData

from MedDiffFMLib.tasks.base import TaskRequest, TaskResult
from MedDiffFMLib.tasks.registry import check_params, task_spec
from MedDiffFMLib.volume import Volume

REGIONS = ("auto", "head_neck", "chest", "abdomen")

Runner = Callable[..., TaskResult]
BINARY_LABELMAP = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()


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


def array_to_image(array: np.ndarray) -> vtkImageData:
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
    # The merge reads binary labelmaps only: a segmentation drawn or imported as closed surfaces
    # would give an empty mask. Convert first, as vtkSlicerSegmentationsModuleLogic::
    # ExportSegmentsToLabelmapNode does (this adds a derived representation; the source
    # representation and the segments stay as they are).
    if not segmentation_node.GetSegmentation().ContainsRepresentation(BINARY_LABELMAP):
        if not segmentation_node.GetSegmentation().CreateRepresentation(BINARY_LABELMAP):
            raise ValueError(f"{segmentation_node.GetName()}: its segments cannot be converted to a binary "
                             "labelmap")
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
# The run path


def prepare_request(input_volume_node, task: str, *, params: Optional[Mapping[str, Any]] = None,
                    region: Optional[str] = None, anatomy_segmentation=None, mask_segmentation=None,
                    mask_segment_id: Optional[str] = None) -> TaskRequest:
    """Check everything the task needs (one-line ValueError before any work), then read the nodes.

    ``params`` are checked against the task registry but passed on as given (the task fills in
    its own defaults), so a typo is reported here and not minutes later.
    """
    spec = task_spec(task)
    if input_volume_node is None:
        raise ValueError("select an input volume")
    if spec.needs_mask and mask_segmentation is None:
        raise ValueError(f"the {task} task needs a mask: select a segmentation and segment (draw one first)")
    if region not in (None, *REGIONS):
        raise ValueError(f"unknown region {region!r}; choose one of {', '.join(REGIONS)}")
    check_params(task, dict(params or {}))
    return build_request(input_volume_node, params=params, region=region,
                         anatomy_segmentation=anatomy_segmentation if spec.accepts_anatomy else None,
                         mask_segmentation=mask_segmentation if spec.needs_mask else None,
                         mask_segment_id=mask_segment_id)


def default_runner() -> Runner:
    """In-process :func:`MedDiffFMLib.tasks.run_task` (imports torch)."""
    from MedDiffFMLib.tasks import run_task

    return run_task


def process(input_volume_node, task: str = "denoise", *, runner: Optional[Runner] = None,
            params: Optional[Mapping[str, Any]] = None, region: Optional[str] = None, anatomy_segmentation=None,
            mask_segmentation=None, mask_segment_id: Optional[str] = None, model=None, controlnet=None,
            device: str = "auto", progress=None, cancel=None, output_volume=None, output_segmentation=None
            ) -> dict[str, Any]:
    """Nodes in, task, nodes out; returns {output name: node} (see :func:`.outputs.result_to_nodes`).

    ``runner`` has :func:`MedDiffFMLib.tasks.run_task`'s signature: the Slicer module passes a
    :class:`MedDiffFMLib.worker.WorkerRunner` (the task runs in a worker process); None runs
    ``run_task`` in this process. Nothing is added to the scene when the runner raises
    (including ``Cancelled``)."""
    from .outputs import result_to_nodes

    request = prepare_request(input_volume_node, task, params=params, region=region,
                              anatomy_segmentation=anatomy_segmentation, mask_segmentation=mask_segmentation,
                              mask_segment_id=mask_segment_id)
    run = runner or default_runner()
    result = run(task, request, model, controlnet=controlnet, device=device, progress=progress, cancel=cancel)
    return result_to_nodes(result, input_volume_node, task, params=request.params, output_volume=output_volume,
                           output_segmentation=output_segmentation)
