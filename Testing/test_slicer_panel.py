"""The panel's decisions, without Qt: task options and defaults from the registry, the mask
segment list on real MRML events, the dependency install plan, the models folder and manager,
and the synthetic sample data. (What only the Qt panel can show is listed in MedDiffFMQt/panel.py.)
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import pytest
from slicer_scene import MODULE_DIR, SHAPE, add_segment, app, slicer  # noqa: F401

from MedDiffFMLib.tasks.registry import TASKS
from MedDiffFMSlicer import dependencies, models, nodes, sampledata, taskoptions
from MedDiffFMSlicer.segments import SegmentList

ROOT = MODULE_DIR.parent


# ---------------------------------------------------------------------------------------------
# Task options and defaults (defect 5)


class Content(Enum):
    lesion = "lesion"
    healthy = "healthy"


class Phase(Enum):
    native = "native"
    arterial = "arterial"
    portal_venous = "portal_venous"


@dataclass
class Panel:
    """Stands in for the parameter node wrapper: fields by name (enums where the panel has them)."""

    task: str = "denoise"
    steps: int = 0
    strength: float = 0.0
    noiseLevel: float = 0.0
    noiseFraction: float = 0.0
    inpaintContent: Content = Content.lesion
    contrastPhase: Phase = Phase.native
    seed: int = 0
    windowSize: int = 0
    overlap: float = 0.0
    batchSize: int = 0
    precision: str = "auto"


def first_run_panel(scene) -> tuple[Panel, object]:
    panel = Panel(**{f: taskoptions.first_run_value(f) for f in taskoptions.PANEL_FIELDS
                     if f not in ("inpaintContent", "contrastPhase")})
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "MedDiffFM")
    taskoptions.adopt_options(panel, node)
    return panel, node


def test_first_run_values_are_the_registry_defaults_of_the_first_task(app):
    panel, _ = first_run_panel(app.scene)
    denoise = TASKS["denoise"].params
    assert taskoptions.DEFAULT_TASK == "denoise" and panel.steps == denoise["steps"].default == 1
    assert panel.strength == denoise["strength"].default and panel.noiseLevel == denoise["noise_level"].default
    assert panel.noiseFraction == TASKS["anomaly"].params["noise_fraction"].default  # first task that has it
    assert taskoptions.parameters("denoise", panel) == {
        name: denoise[name].default for name in ("steps", "strength", "noise_level", "seed", "window", "overlap",
                                                 "batch_size", "precision")}
    assert taskoptions.field_range("noiseFraction") == (0.0, 1.0)
    assert taskoptions.field_choices("precision") == ("auto", "fp32", "bf16", "fp16")


def test_defaults_only_when_the_user_picks_another_task(app):
    scene = app.scene
    panel, node = first_run_panel(scene)
    panel.steps = 7  # the user's edit
    panel.task = "anomaly"  # set from Python, or read from a saved scene: nothing is reset
    assert panel.steps == 7 and node.GetParameter(taskoptions.OPTIONS_TASK_PARAMETER) == "denoise"
    assert taskoptions.choose_task(panel, node)  # the user picks it in the menu
    assert panel.steps == TASKS["anomaly"].params["steps"].default
    assert panel.noiseFraction == TASKS["anomaly"].params["noise_fraction"].default
    panel.steps = 9
    assert not taskoptions.choose_task(panel, node) and panel.steps == 9  # picked again: edits kept
    panel.task = "inpaint"
    taskoptions.choose_task(panel, node)
    assert panel.inpaintContent is Content.lesion and panel.batchSize == TASKS["inpaint"].params["batch_size"].default
    panel.task = "synthesize"
    taskoptions.choose_task(panel, node)
    assert panel.contrastPhase is Phase(TASKS["synthesize"].params["contrast_phase"].default)
    assert taskoptions.parameters("synthesize", panel)["contrast_phase"] == "portal_venous"
    panel.task = "inpaint"
    taskoptions.choose_task(panel, node)
    # a saved and reloaded scene keeps the task its options belong to
    scene.SetSaveToXMLString(1)
    scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetLoadFromXMLString(1)
    loaded.SetSceneXMLString(scene.GetSceneXMLString())
    loaded.Import()
    again = loaded.GetNodeByID(node.GetID())
    assert again.GetParameter(taskoptions.OPTIONS_TASK_PARAMETER) == "inpaint"
    panel.steps = 11
    assert not taskoptions.choose_task(panel, again) and panel.steps == 11


def test_readme_states_the_registry_defaults():
    """The README's Slicer task table ("Label (`task`) | clicks | options | result") gives each
    task's first-run options as the registry has them."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| [^|`]*\(`(\w+)`\) \|[^|]*\|([^|]*)\|", text, re.M)}
    assert set(rows) == set(TASKS), rows
    for task in TASKS:
        for field, value in taskoptions.task_defaults(task).items():
            if field in ("seed", "windowSize", "overlap", "batchSize", "precision"):
                continue  # common sampling options, listed once below the table
            shown = f"{taskoptions.PANEL_FIELDS[field]} {value}"
            assert shown in rows[task], (task, shown, rows[task])


# ---------------------------------------------------------------------------------------------
# The mask segment list (defect 3)


def test_segment_list_follows_segment_events(app):
    scene = app.scene
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Mask")
    node_modified = []
    seg.AddObserver(slicer.vtkCommand.ModifiedEvent if hasattr(slicer, "vtkCommand") else "ModifiedEvent",
                    lambda *a: node_modified.append(1))
    changes = []
    tracker = SegmentList(lambda: changes.append(tracker.segments()))
    tracker.set_segmentation_node(seg)
    assert changes[-1] == []
    box = np.zeros(SHAPE, bool)
    box[2:4, 2:4, 2:4] = True
    first = add_segment(seg, box, np.eye(4), "first")
    second = add_segment(seg, box, np.eye(4), "second")
    assert changes[-1] == [(first, "first"), (second, "second")]
    assert not node_modified  # why observing the node's ModifiedEvent left the list stale
    seg.GetSegmentation().GetSegment(first).SetName("renamed")
    assert changes[-1][0] == (first, "renamed")
    seg.GetSegmentation().RemoveSegment(first)
    assert changes[-1] == [(second, "second")]
    # a deleted segment never reaches Apply: it is not chosen, and the node logic refuses it
    assert tracker.choose(first) == second
    with pytest.raises(ValueError, match="not in"):
        nodes.mask_from_segment(seg, first, scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))
    seg.GetSegmentation().RemoveSegment(second)
    assert changes[-1] == [] and tracker.choose(second) is None
    count = len(changes)
    tracker.close()
    add_segment(seg, box, np.eye(4), "after close")
    assert len(changes) == count


# ---------------------------------------------------------------------------------------------
# Dependencies (defect 1)

REQUIREMENTS = ["monai>=1.4", "safetensors>=0.4", "nibabel>=5.0"]


def versions(**v):
    return lambda name: v.get(name.lower())


def test_install_plan_checks_versions_and_never_installs_torch():
    plan = dependencies.plan(REQUIREMENTS + ["torch>=2.0"],
                             versions(torch="2.5.1+cu124", monai="1.3.2", safetensors="0.4.5"))
    assert plan.torch_action == "ok" and plan.install == ["monai>=1.4", "nibabel>=5.0"]  # too old, missing
    assert plan.constraints == ["torch==2.5.1+cu124"]  # pip cannot swap the GPU build
    assert dependencies.plan(REQUIREMENTS, versions(torch="1.13.1")).torch_action == "too_old"
    assert dependencies.plan(REQUIREMENTS, versions()).torch_action == "install"
    assert dependencies.read_requirements(str(MODULE_DIR / "Resources" / "requirements.txt"))


def test_ensure_uses_the_pytorch_extension_and_a_torch_constraint(tmp_path):
    installed = {"torch": None, "monai": None, "safetensors": "0.4.5", "nibabel": "5.2.0"}
    pip_calls, torch_calls = [], []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation, torchVersionRequirement):
            torch_calls.append(torchVersionRequirement)
            installed["torch"] = "2.4.0+cu121"
            return object()

    def pip_install(args):
        pip_calls.append(list(args))
        constraints = Path(args[args.index("-c") + 1]).read_text()
        assert constraints.strip() == "torch==2.4.0+cu121"
        installed["monai"] = "1.4.0"

    extension = type(sys)("PyTorchUtils")
    extension.PyTorchUtilsLogic = PyTorchUtilsLogic
    final = dependencies.ensure(REQUIREMENTS, ask=False, pip_install=pip_install, installed=installed.get,
                                pytorch_utils=lambda: extension, packaging_module=None)
    assert torch_calls == [">=2.2"] and final.nothing_to_do
    assert len(pip_calls) == 1 and not any(a.startswith("torch") for a in pip_calls[0])
    with pytest.raises(dependencies.DependencyError, match="the .PyTorch. extension"):  # no extension: no pip torch
        dependencies.ensure(REQUIREMENTS, installed=versions(), pytorch_utils=lambda: None, pip_install=pip_install)
    with pytest.raises(dependencies.DependencyError, match="PyTorch Utils"):
        dependencies.ensure(REQUIREMENTS, installed=versions(torch="2.0.1"), pip_install=pip_install)
    assert len(pip_calls) == 1


def test_slicer_packaging_is_imported_before_it_is_tested(monkeypatch):
    """``slicer.packaging`` is a submodule: not an attribute of ``slicer`` until imported."""
    calls = []
    module = type(sys)("slicer.packaging")
    module.pip_ensure = lambda reqs, **kw: calls.append((reqs, kw))
    monkeypatch.setitem(sys.modules, "slicer.packaging", module)
    assert not hasattr(slicer, "packaging") and dependencies.slicer_packaging() is module
    installed = {"torch": "2.5.0", "monai": None, "safetensors": "0.4.5", "nibabel": "5.2.0"}

    def pip_ensure(reqs, **kw):
        calls.append((reqs, kw))
        installed["monai"] = "1.4.0"

    module.pip_ensure = pip_ensure
    dependencies.ensure(REQUIREMENTS, ask=False, installed=installed.get, pip_install=None)
    assert calls[0][0] == ["monai>=1.4"] and calls[0][1]["constraints"].endswith("constraints.txt")


# ---------------------------------------------------------------------------------------------
# Models folder and model manager (defect 6, feature)


def test_clearing_the_models_folder_restores_the_default(tmp_path):
    from MedDiffFMLib import weights

    env = {}
    models.apply_models_directory(str(tmp_path), env, startup=None)
    assert env[weights.ENV_MODELS_DIR] == str(tmp_path)
    models.apply_models_directory("", env, startup=None)
    assert weights.ENV_MODELS_DIR not in env  # not left at the previous folder
    models.apply_models_directory("", env, startup="/shared/models")
    assert env[weights.ENV_MODELS_DIR] == "/shared/models"


def test_model_manager_lists_imports_and_removes(tmp_path, monkeypatch, tiny_model_dir):
    from MedDiffFMLib import weights

    monkeypatch.setenv(weights.ENV_MODELS_DIR, str(tmp_path / "models"))
    bundled = {m.id: m for m in models.installed_models()}
    base = bundled["meddifffm-demo-base"]
    assert base.source == "bundled" and base.verified and not base.removable
    assert base.size_bytes > (base.location / "model.safetensors").stat().st_size
    target = models.import_model(str(Path(tiny_model_dir) / "config.json"))
    listed = {m.id: m for m in models.installed_models()}
    mine = listed[target.name]
    assert mine.source == "custom" and mine.verified is None and mine.removable
    assert mine.sha256 == weights.sha256_file(Path(tiny_model_dir) / "model.safetensors")
    with pytest.raises(ValueError, match="ships with the extension"):
        models.remove_model("meddifffm-demo-base")
    models.remove_model(target.name)
    assert target.name not in {m.id for m in models.installed_models()} and not target.exists()


# ---------------------------------------------------------------------------------------------
# Sample data (feature)


def test_sample_data_ships_a_synthetic_phantom_with_a_mask(app):
    (source,) = sampledata.sources(str(MODULE_DIR))
    assert "synthetic" in source["sampleName"] and "not a patient" in source["sampleName"]
    scene = app.scene
    loaded = []
    for uri, checksum, file_type in zip(source["uris"], source["checksums"], source["loadFileTypes"]):
        path = uri.removeprefix("file://")
        assert checksum == "SHA256:" + sampledata.sha256(path), path
        cls = "vtkMRMLScalarVolumeNode" if file_type == "VolumeFile" else "vtkMRMLSegmentationNode"
        node = scene.AddNewNodeByClass(cls)
        storage = (slicer.vtkMRMLVolumeArchetypeStorageNode() if file_type == "VolumeFile"
                   else slicer.vtkMRMLSegmentationStorageNode())
        storage.SetFileName(path)
        assert storage.ReadData(node)
        loaded.append(node)
    ct, mask = loaded
    volume = nodes.volume_from_node(ct)
    assert volume.array.shape == sampledata.SHAPE_KJI
    assert np.allclose(np.linalg.norm(volume.ijk_to_ras[:3, :3], axis=0)[::-1], sampledata.SPACING_KJI)
    assert volume.array.min() < -900 and -200 < np.median(volume.array[volume.array > -500]) < 200  # air, soft tissue
    segment_id = mask.GetSegmentation().GetNthSegmentID(0)
    inside = nodes.mask_from_segment(mask, segment_id, ct).array
    assert 300 < inside.sum() < 3000 and (volume.array[inside] > -500).all()  # a ball in the body
