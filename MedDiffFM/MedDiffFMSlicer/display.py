"""How results look: standard terminology for output segments, the anomaly map with a threshold
and a colour legend, and segmentations in 3D. MRML only (no Qt), so it is tested on slicer-core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import slicer
from vtkmodules.util import numpy_support

# Colour maps for the anomaly map, best first (the file-based ones exist in the Slicer application).
HEAT_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
                       "vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeIron")
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
ALTERED_STRUCTURE = ("SCT", "49755003", "Morphologically Altered Structure")
TISSUE = ("SCT", "85756007", "Tissue")


@dataclass(frozen=True)
class SegmentTerm:
    """A DICOM / SNOMED CT terminology entry of one output segment, with its display colour.

    ``category`` and ``type`` are (coding scheme, code value, code meaning); ``rgb`` is the
    recommended display colour of the DICOM master list where it gives one (0..255).
    """

    category: tuple[str, str, str]
    type: tuple[str, str, str]
    rgb: tuple[int, int, int]

    @property
    def name(self) -> str:
        """The segment's name: the type's code meaning (what Slicer's terminology selector shows)."""
        return self.type[2]

    def entry(self) -> str:
        """Slicer's terminology entry string: context~category~type~modifier~region context~region~modifier."""
        def code(c):
            return "^".join(c)

        return "~".join((TERMINOLOGY_CONTEXT, code(self.category), code(self.type), "^^", ANATOMIC_CONTEXT,
                         "^^", "^^"))


MASS = SegmentTerm(ALTERED_STRUCTURE, ("SCT", "4147007", "Mass"), (144, 238, 144))
HEALTHY_TISSUE = SegmentTerm(TISSUE, ("SCT", "85756007", "Tissue"), (128, 174, 128))
# SNOMED CT "Lesion": a finding of unknown kind, which is what an anomaly map marks. The DICOM
# master list gives it no colour; red-orange stands out on CT grey.
LESION = SegmentTerm(ALTERED_STRUCTURE, ("SCT", "52988006", "Lesion"), (230, 80, 40))


def segment_term(task: str, output: str, params: Mapping[str, Any]) -> Optional[SegmentTerm]:
    """The terminology of a task's output segment (None: no standard term; a plain segment)."""
    if output == "anomaly":
        return LESION
    if output == "lesion":
        return MASS
    if output == "inpainted_region":
        return HEALTHY_TISSUE if params.get("content") == "healthy" else MASS
    return None


def set_segment_terminology(segment, term: SegmentTerm) -> None:
    """Name, colour and terminology entry of a vtkSegment (Slicer 5.8+ API, else the tag)."""
    segment.SetName(term.name)
    segment.SetColor(*(c / 255.0 for c in term.rgb))
    if hasattr(segment, "SetTerminology"):
        segment.SetTerminology(term.entry())
    else:  # Slicer < 5.8
        segment.SetTag("TerminologyEntry", term.entry())


# ---------------------------------------------------------------------------------------------
# Anomaly map


def heat_color_node_id(scene) -> Optional[str]:
    for node_id in HEAT_COLOR_NODE_IDS:
        if scene.GetNodeByID(node_id) is not None:
            return node_id
    return None


def _voxels(volume_node) -> np.ndarray:
    image = volume_node.GetImageData()
    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        return np.zeros(0, np.float32)
    return numpy_support.vtk_to_numpy(scalars)


def show_anomaly_map(volume_node, threshold: float) -> Any:
    """Heat colours from ``threshold`` up, transparent below it, and a colour legend.

    The map is in robust z-score units (the anomaly task's ``threshold`` parameter is in the same
    units), so voxels below the threshold are hidden instead of darkening the image under a flat
    overlay. Returns the colour legend display node (None where the colour logic is missing).
    """
    display = volume_node.GetDisplayNode()
    if display is None:
        volume_node.CreateDefaultDisplayNodes()
        display = volume_node.GetDisplayNode()
    color_id = heat_color_node_id(volume_node.GetScene())
    if color_id is not None:
        display.SetAndObserveColorNodeID(color_id)
    values = _voxels(volume_node)
    values = values[:: max(1, values.size // 2_000_000)]  # a percentile needs no more samples
    top = float(np.percentile(values, 99.5)) if values.size else 1.0
    top = max(top, 2.0 * threshold, threshold + 1e-3)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(threshold, top)
    set_anomaly_threshold(volume_node, threshold)
    legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(volume_node)
    if legend is not None:
        legend.SetTitleText("anomaly (z)")
        legend.SetLabelFormat("%.1f")
        legend.SetVisibility(True)
    return legend


def set_anomaly_threshold(volume_node, threshold: float) -> None:
    """Show only voxels at or above ``threshold`` (the panel's threshold slider calls this)."""
    display = volume_node.GetDisplayNode()
    top = max(float(display.GetWindowLevelMax()), threshold + 1e-3)
    display.SetApplyThreshold(True)
    display.SetThreshold(threshold, max(top, float(np.max(_voxels(volume_node), initial=top))))
    display.SetWindowLevelMinMax(threshold, top)


# ---------------------------------------------------------------------------------------------
# Segmentations


def show_in_3d(segmentation_node, visible: bool = True) -> None:
    """Segments as surfaces in the 3D views (what Segment Editor's "Show 3D" button does)."""
    if visible:
        segmentation_node.CreateClosedSurfaceRepresentation()
    display = segmentation_node.GetDisplayNode()
    if display is None:
        segmentation_node.CreateDefaultDisplayNodes()
        display = segmentation_node.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility3D(visible)
