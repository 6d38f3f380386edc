"""A MRML scene without the Slicer application (``slicer-core`` wheel), for batch runs and tests.

Set up the way Slicer's application does it (and Kitware's trame-slicer): an application logic
with the default colour nodes, and the volumes, segmentations and subject
hierarchy module logics registered on the scene.

Example::

    from MedDiffFMSlicer.headless import create_scene
    from MedDiffFMSlicer import nodes
    app = create_scene()
    ct = nodes.new_volume_node(app.scene, volume, "CT")
    outputs = nodes.process(ct, "denoise", params={"steps": 10})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import slicer


@dataclass
class HeadlessScene:
    scene: Any
    app_logic: Any
    logics: dict[str, Any] = field(default_factory=dict)


def _logic_name(logic) -> str:
    name = type(logic).__name__
    for part in ("vtkSlicer", "Module", "Logic"):
        name = name.replace(part, "")
    return name


def create_scene() -> HeadlessScene:
    """A new MRML scene with the module logics MedDiffFM's node code relies on."""
    scene = slicer.vtkMRMLScene()
    # The application registers the Colors module's MRML classes when it loads the module.
    scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    logics: dict[str, Any] = {}
    # (Terminologies are left out: their logic needs data files the wheel does not ship.)
    for cls_name in ("vtkSlicerVolumesLogic",
                     "vtkSlicerSegmentationsModuleLogic", "vtkSlicerSubjectHierarchyModuleLogic"):
        cls = getattr(slicer, cls_name, None)
        if cls is None:
            continue
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        name = _logic_name(logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    # The subject hierarchy node is a singleton made on demand.
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    return HeadlessScene(scene, app_logic, logics)
