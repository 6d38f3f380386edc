"""MedDiffFM.py and its Qt panel import cleanly (with stand-ins for Qt and the parts of Slicer's
Python that slicer-core lacks), and the parameter node takes its first-run values, its ranges
and its menus from the task registry. The panel itself runs only inside Slicer."""

from __future__ import annotations

import importlib.util
import sys
import types
from enum import Enum

import pytest
from slicer_scene import MODULE_DIR, slicer  # noqa: F401

from MedDiffFMLib.tasks.registry import TASKS
from MedDiffFMSlicer import taskoptions


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum


class _Base:
    def __init__(self, *args, **kwargs):
        pass


@pytest.fixture()
def module(monkeypatch):
    stubs = {
        "qt": types.ModuleType("qt"),
        "vtk": types.ModuleType("vtk"),
        "slicer.ScriptedLoadableModule": types.ModuleType("slicer.ScriptedLoadableModule"),
        "slicer.parameterNodeWrapper": types.ModuleType("slicer.parameterNodeWrapper"),
        "slicer.i18n": types.ModuleType("slicer.i18n"),
    }
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleWidget",
                 "ScriptedLoadableModuleTest"):
        setattr(stubs["slicer.ScriptedLoadableModule"], name, type(name, (_Base,), {}))
    stubs["slicer.parameterNodeWrapper"].WithinRange = WithinRange
    stubs["slicer.parameterNodeWrapper"].parameterNodeWrapper = lambda cls: cls
    stubs["slicer.i18n"].tr = lambda text: text
    stubs["slicer.i18n"].translate = lambda context, text: text
    for name, stub in stubs.items():
        monkeypatch.setitem(sys.modules, name, stub)
    for name in ("MedDiffFM", "MedDiffFMQt", "MedDiffFMQt.panel", "MedDiffFMQt.modelsection", "MedDiffFMQt.runsection",
                 "MedDiffFMQt.selftest"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = importlib.util.spec_from_file_location("MedDiffFM", MODULE_DIR / "MedDiffFM.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "MedDiffFM", mod)
    spec.loader.exec_module(mod)
    return mod


def test_module_file_imports_and_binds_its_classes(module):
    assert module.MedDiffFMWidget.Logic is module.MedDiffFMLogic
    assert module.MedDiffFMTest.__module__ == "MedDiffFMQt.selftest"
    assert [t.value for t in module.Task] == list(TASKS)
    assert module.Task("anomaly").label() == TASKS["anomaly"].label


def test_parameter_node_first_run_values_and_ranges_come_from_the_registry(module):
    node = module.MedDiffFMParameterNode
    assert node.task.value == taskoptions.DEFAULT_TASK
    for field in taskoptions.PANEL_FIELDS:
        value = getattr(node, field)
        assert (value.value if isinstance(value, Enum) else value) == taskoptions.first_run_value(field), field
        annotation = node.__annotations__[field]
        bounds = [a for a in getattr(annotation, "__metadata__", ()) if isinstance(a, WithinRange)]
        if bounds:
            assert (bounds[0].minimum, bounds[0].maximum) == taskoptions.field_range(field), field
    denoise = TASKS["denoise"].params
    assert node.steps == denoise["steps"].default and node.batchSize == denoise["batch_size"].default
    assert {p.value for p in module.Precision} == set(denoise["precision"].choices)
    assert {c.value for c in module.InpaintContent} == set(TASKS["inpaint"].params["content"].choices)
    assert {c.value for c in module.ContrastPhase} == set(TASKS["synthesize"].params["contrast_phase"].choices)
