"""MedDiffFM: a 3D CT diffusion foundation model in 3D Slicer.

The Qt panel only. Everything it decides or does to the scene lives in ``MedDiffFMSlicer``
(no Qt; tested on the ``slicer-core`` wheel against real MRML):

* ``taskoptions``: the task menu, options and defaults, from the library's task registry;
* ``nodes`` / ``outputs`` / ``display``: nodes -> task request, results -> nodes beside the input;
* ``run``: the task in a worker process (``PythonSlicer``), polled from a timer, so Slicer stays
  responsive, Cancel stops at once and a GPU out-of-memory error cannot crash Slicer;
* ``segments``, ``models``, ``dependencies``, ``sampledata``: the mask segment list, the model
  manager, the first-Apply install that never replaces PyTorch, the synthetic sample volume.
"""

import logging
import os
import shutil
import sys
import time
from enum import Enum
from typing import Annotated

import qt

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

    def translate(context, text):
        return text


def _addBundledLibraryToPath() -> None:
    """``MedDiffFMLib`` sits beside this file once installed, one folder up in a source checkout."""
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    for candidate in (moduleDir, os.path.dirname(moduleDir)):
        if os.path.isdir(os.path.join(candidate, "MedDiffFMLib")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            break


_addBundledLibraryToPath()

from MedDiffFMLib.tasks.registry import TASKS  # noqa: E402 (needs the path above; no torch)
from MedDiffFMSlicer import taskoptions  # noqa: E402
from MedDiffFMSlicer.taskoptions import field_range, first_run_value  # noqa: E402

SETTINGS_MODELS_DIRECTORY = "MedDiffFM/ModelsDirectory"
SETTINGS_MODEL = "MedDiffFM/Model"
SETTINGS_CONTROLNET = "MedDiffFM/ControlNet"


#
# Combo box choices (value = what the library expects; tasks and choices from the registry)
#


class _LabelledEnum(Enum):
    def label(self):
        return _(_LABELS.get(type(self).__name__, {}).get(self.value, self.value))


_LABELS = {
    "Task": {name: spec.label for name, spec in TASKS.items()},
    "Region": {"auto": "Auto (guess from image)", "head_neck": "Head and neck", "chest": "Chest",
               "abdomen": "Abdomen"},
    "Device": {"auto": "Auto (GPU if available)", "cuda": "GPU (CUDA)", "cpu": "CPU"},
    "Precision": {"auto": "Auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"},
    "InpaintContent": {"lesion": "Lesion", "healthy": "Healthy tissue"},
    "ContrastPhase": {"native": "Native (no contrast)", "arterial": "Arterial", "portal_venous": "Portal venous"},
}
Task = _LabelledEnum("Task", {name: name for name in TASKS})
Region = _LabelledEnum("Region", {name: name for name in _LABELS["Region"]})
Device = _LabelledEnum("Device", {name: name for name in _LABELS["Device"]})
Precision = _LabelledEnum("Precision", {c: c for c in taskoptions.field_choices("precision")})
InpaintContent = _LabelledEnum("InpaintContent", {c: c for c in taskoptions.field_choices("inpaintContent")})
ContrastPhase = _LabelledEnum("ContrastPhase", {c: c for c in taskoptions.field_choices("contrastPhase")})

# Panel rows (label, editor) of each task option, shown only for the tasks that use it.
OPTION_WIDGETS = {
    "steps": ("stepsLabel", "stepsSpinBox"),
    "strength": ("strengthLabel", "strengthSliderWidget"),
    "noiseLevel": ("noiseLevelLabel", "noiseLevelSpinBox"),
    "noiseFraction": ("noiseFractionLabel", "noiseFractionSliderWidget"),
    "inpaintContent": ("inpaintContentLabel", "inpaintContentComboBox"),
    "contrastPhase": ("contrastPhaseLabel", "contrastPhaseComboBox"),
    "seed": ("seedLabel", "seedSpinBox"),
    "windowSize": ("windowSizeLabel", "windowSizeSpinBox"),
    "overlap": ("overlapLabel", "overlapSliderWidget"),
    "batchSize": ("batchSizeLabel", "batchSizeSpinBox"),
    "precision": ("precisionLabel", "precisionComboBox"),
}
MASK_WIDGETS = ("maskSegmentationLabel", "maskSegmentationSelector", "maskSegmentLabel", "maskSegmentComboBox",
                "maskEditorCollapsibleButton")
ANOMALY_WIDGETS = ("anomalyThresholdLabel", "anomalyThresholdSliderWidget")


#
# MedDiffFM
#


class MedDiffFM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDiffFM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDiffFM Developers (MedDiffFM project)"]
        self.parent.helpText = _("""
A 3D CT diffusion foundation model for six tasks: denoising, anomaly detection, CT synthesis,
super-resolution, lesion generation and inpainting. Choose the input CT and a task, adjust the few
options the task shows, and press Apply; the results appear as new nodes in the input's study.
The first Apply installs MONAI and a few small packages (PyTorch comes from the PyTorch extension).
Try it on <i>Sample Data → MedDiffFM → synthetic chest</i> (a phantom, not a patient).
See the <a href="https://github.com/MedDiffFM/SlicerMedDiffFM#3d-slicer">documentation</a>.
<br><br>Research use only: outputs are generated images, not measurements, and are not for diagnosis.
""")
        self.parent.acknowledgementText = _("""
The method follows MedDiff-FM, a diffusion-based foundation model for versatile medical image
applications. Built on PyTorch and MONAI; the background processing and model handling follow the
patterns of the MONAIAuto3DSeg and TotalSegmentator Slicer extensions.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Sample Data → MedDiffFM: a synthetic phantom CT with a drawn mask (no download)."""
    import SampleData
    from MedDiffFMSlicer import sampledata

    moduleDir = os.path.dirname(os.path.abspath(__file__))
    for source in sampledata.sources(moduleDir):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(category="MedDiffFM", **source)


#
# MedDiffFMParameterNode (first-run values: the registry's defaults of the first task)
#


@parameterNodeWrapper
class MedDiffFMParameterNode:
    """What the panel shows; saved with the scene.

    inputVolume - the CT to process (never modified).
    task, region - what to do and where the image is from.
    anatomySegmentation - optional TotalSegmentator segmentation (segment names = classes).
    maskSegmentation - the segmentation holding the lesion / inpainting mask segment.
    steps ... precision - task parameters (only those the task uses are shown and sent).
    device - auto, GPU or CPU.
    outputVolume, outputSegmentation - None: create new nodes named after the input and task.
    showResult - show the outputs in the slice views; show3D - segmentations also in 3D.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    task: Task = Task(taskoptions.DEFAULT_TASK)
    region: Region = Region.auto
    anatomySegmentation: vtkMRMLSegmentationNode
    maskSegmentation: vtkMRMLSegmentationNode
    steps: Annotated[int, WithinRange(*field_range("steps"))] = first_run_value("steps")
    strength: Annotated[float, WithinRange(*field_range("strength"))] = first_run_value("strength")
    noiseLevel: Annotated[float, WithinRange(*field_range("noiseLevel"))] = first_run_value("noiseLevel")
    noiseFraction: Annotated[float, WithinRange(*field_range("noiseFraction"))] = first_run_value("noiseFraction")
    inpaintContent: InpaintContent = InpaintContent(first_run_value("inpaintContent"))
    contrastPhase: ContrastPhase = ContrastPhase(first_run_value("contrastPhase"))
    seed: Annotated[int, WithinRange(*field_range("seed"))] = first_run_value("seed")
    windowSize: Annotated[int, WithinRange(*field_range("windowSize"))] = first_run_value("windowSize")
    overlap: Annotated[float, WithinRange(*field_range("overlap"))] = first_run_value("overlap")
    batchSize: Annotated[int, WithinRange(*field_range("batchSize"))] = first_run_value("batchSize")
    precision: Precision = Precision(first_run_value("precision"))
    device: Device = Device.auto
    outputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    showResult: bool = True
    show3D: bool = False


def _formatDuration(seconds) -> str:
    if seconds is None:
        return ""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return _("{s} s").format(s=seconds)
    if seconds < 3600:
        return _("{m} min {s:02d} s").format(m=seconds // 60, s=seconds % 60)
    return _("{h} h {m:02d} min").format(h=seconds // 3600, m=(seconds % 3600) // 60)


def formatProgress(progress) -> str:
    """One line: step, window, stage, time left."""
    parts = []
    if progress.total_steps:
        parts.append(_("step {step}/{total}").format(step=progress.step, total=progress.total_steps))
    if progress.total_windows:
        parts.append(_("window {w}/{total}").format(w=progress.window, total=progress.total_windows))
    if progress.stage:
        parts.append(progress.stage)
    if progress.eta_s is not None:
        parts.append(_("about {t} left").format(t=_formatDuration(progress.eta_s)))
    return " · ".join(parts)


#
# MedDiffFMLogic
#


class MedDiffFMLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from the Python console without it.

    Example (batch loop)::

        logic = slicer.util.getModuleLogic("MedDiffFM")
        outputs = logic.process(volumeNode, task="denoise", steps=2)
        outputs["denoised"]  # the new volume node
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._dependenciesChecked = False
        self.applyModelsDirectorySetting()

    def getParameterNode(self):
        node = MedDiffFMParameterNode(super().getParameterNode())
        taskoptions.adopt_options(node, node.parameterNode)
        return node

    def getSegmentEditorNode(self):
        node = slicer.mrmlScene.GetSingletonNode("MedDiffFM", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("MedDiffFM")
            node = slicer.mrmlScene.AddNode(node)
        return node

    # -- settings (main thread only: QSettings) ------------------------------------------------

    def modelsDirectory(self) -> str:
        from MedDiffFMLib import weights

        return qt.QSettings().value(SETTINGS_MODELS_DIRECTORY, "") or str(weights.cache_dir())

    def setModelsDirectory(self, path: str) -> None:
        """An empty path restores the default folder."""
        qt.QSettings().setValue(SETTINGS_MODELS_DIRECTORY, path or "")
        self.applyModelsDirectorySetting()

    def applyModelsDirectorySetting(self) -> None:
        from MedDiffFMSlicer import models

        models.apply_models_directory(qt.QSettings().value(SETTINGS_MODELS_DIRECTORY, ""))

    def workerSettings(self):
        """How to start the worker, as plain values (safe to hand to a background thread)."""
        from MedDiffFMLib.worker import library_parent
        from MedDiffFMSlicer.run import WorkerSettings

        self.applyModelsDirectorySetting()
        from MedDiffFMLib import weights

        return WorkerSettings(python=shutil.which("PythonSlicer") or sys.executable,
                              pythonpath=(library_parent(),), env={weights.ENV_MODELS_DIR: str(weights.cache_dir())},
                              work_root=slicer.app.temporaryPath)

    # -- dependencies --------------------------------------------------------------------------

    def requirementsPath(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """PyTorch through the PyTorch extension, the rest with pip under a constraint that keeps
        the installed PyTorch. Called on the first Apply, never when the module loads."""
        if self._dependenciesChecked:
            return
        from MedDiffFMSlicer import dependencies

        dependencies.ensure(dependencies.read_requirements(self.requirementsPath()), ask=askConfirmation,
                            pip_install=slicer.util.pip_install,
                            confirm=lambda text: slicer.util.confirmOkCancelDisplay(_(text)))
        self._dependenciesChecked = True

    # -- running -------------------------------------------------------------------------------

    def start(self, inputVolume, task: str, *, params=None, region=None, anatomySegmentation=None,
              maskSegmentation=None, maskSegmentId=None, model=None, controlnet=None, device="auto",
              outputVolume=None, outputSegmentation=None, onProgress=None, onLog=None):
        """Start a task in the worker process; returns the running job at once (poll it, then
        ``job.finish()`` adds the nodes). The equivalent console command is logged."""
        from MedDiffFMSlicer import run

        job = run.start(self.workerSettings(), inputVolume, task, params=params, region=region,
                        anatomy_segmentation=anatomySegmentation, mask_segmentation=maskSegmentation,
                        mask_segment_id=maskSegmentId, model=model, controlnet=controlnet, device=device,
                        output_volume=outputVolume, output_segmentation=outputSegmentation,
                        on_progress=onProgress, on_log=onLog)
        logging.info(f"MedDiffFM: the same run from the Python console:\n{job.command}")
        return job

    def process(self, inputVolume, task: str = "denoise", *, region=None, anatomySegmentation=None,
                maskSegmentation=None, maskSegmentId=None, model=None, controlnet=None, device="auto",
                outputVolume=None, outputSegmentation=None, inProcess=False, showResult=False, **params) -> dict:
        """Run a task and wait (console and batch use). Returns {output name: new node}.

        ``params`` are the library's task parameters (e.g. ``steps=2, seed=1``). The task runs in
        the worker process unless ``inProcess=True``. Nothing is added to the scene on failure.
        """
        from MedDiffFMLib.worker import WorkerRunner
        from MedDiffFMSlicer import nodes

        self.ensureDependencies()
        start = time.time()
        runner = None if inProcess else WorkerRunner(on_log=logging.info, **self.workerSettings().client_options())
        outputs = nodes.process(inputVolume, task, runner=runner, params=params, region=region,
                                anatomy_segmentation=anatomySegmentation, mask_segmentation=maskSegmentation,
                                mask_segment_id=maskSegmentId, model=model, controlnet=controlnet, device=device,
                                progress=lambda p: slicer.app.processEvents(), output_volume=outputVolume,
                                output_segmentation=outputSegmentation)
        logging.info(f"MedDiffFM {task} finished in {time.time() - start:.1f} s")
        if showResult:
            self.showResults(inputVolume, outputs)
        return outputs

    @staticmethod
    def showResults(inputVolume, outputs: dict, show3D: bool = False) -> None:
        """Slice views: the anomaly map (thresholded, with its legend) over the input, or the new
        image; segmentations shown, and in 3D when asked."""
        from MedDiffFMSlicer import display

        anomalyMap = outputs.get("anomaly_map")
        volumes = [n for k, n in outputs.items() if n.IsA("vtkMRMLScalarVolumeNode") and k != "anomaly_map"]
        if anomalyMap is not None:
            # below-threshold voxels are transparent, so full opacity does not darken the image
            slicer.util.setSliceViewerLayers(background=inputVolume, foreground=anomalyMap, foregroundOpacity=1.0,
                                             fit=True)
        elif volumes:
            slicer.util.setSliceViewerLayers(background=volumes[0], foreground=inputVolume, foregroundOpacity=0.0,
                                             fit=True)
        for node in outputs.values():
            if node.IsA("vtkMRMLSegmentationNode"):
                display.show_in_3d(node, show3D)


#
# MedDiffFMWidget: the panel (Qt code in MedDiffFMQt/panel.py), bound to this module's classes
#


from MedDiffFMQt.panel import Panel  # noqa: E402


class MedDiffFMWidget(Panel):
    Logic = MedDiffFMLogic
    Device = Device
    optionWidgets = OPTION_WIDGETS
    maskWidgets = MASK_WIDGETS
    anomalyWidgets = ANOMALY_WIDGETS
    settingsModel = SETTINGS_MODEL
    settingsControlNet = SETTINGS_CONTROLNET
    formatProgress = staticmethod(formatProgress)


#
# MedDiffFMTest: the self-test ("Reload and Test", ctest), in MedDiffFMQt/selftest.py
#


from MedDiffFMQt.selftest import MedDiffFMTest  # noqa: E402,F401 (found by name by Slicer)
