"""MedDiffFM: a 3D CT diffusion foundation model in 3D Slicer.

Thin glue around the Slicer-free library ``MedDiffFMLib`` (bundled with the module):

* ``MedDiffFMSlicer.nodes`` turns nodes into library volumes and results into nodes (MRML only);
* tasks run in a separate process (``MedDiffFMLib.worker`` through ``PythonSlicer``), so the
  application stays responsive, Cancel stops at once and a GPU out-of-memory error cannot
  crash Slicer;
* Python dependencies are installed on the first Apply, never when the module is loaded.
"""

import importlib.util
import logging
import os
import shutil
import sys
import time
from enum import Enum
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin
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

SETTINGS_MODELS_DIRECTORY = "MedDiffFM/ModelsDirectory"
SETTINGS_MODEL = "MedDiffFM/Model"
SETTINGS_CONTROLNET = "MedDiffFM/ControlNet"
MINIMUM_TORCH_VERSION = "2.2"


#
# Choices shown in the combo boxes (value = what the library expects)
#


class Task(Enum):
    denoise = "denoise"
    anomaly = "anomaly"
    synthesize = "synthesize"
    superres = "superres"
    lesion = "lesion"
    inpaint = "inpaint"

    def label(self):
        return {
            "denoise": _("Denoise"),
            "anomaly": _("Anomaly detection"),
            "synthesize": _("Synthesize CT"),
            "superres": _("Super-resolution (thinner slices)"),
            "lesion": _("Generate lesion in mask"),
            "inpaint": _("Inpaint mask"),
        }[self.value]


TASK_DESCRIPTIONS = {
    "denoise": "Removes noise (e.g. low-dose CT) while keeping anatomy. Output: denoised volume.",
    "anomaly": "Rebuilds the image as the model expects healthy anatomy and maps the differences. "
               "Outputs: anomaly map (heat colours), reconstruction and a thresholded anomaly segmentation.",
    "synthesize": "Generates a new CT on the input's grid, following the anatomy segmentation when given.",
    "superres": "Makes thick-slice CT thin-slice. The output has its own, finer grid.",
    "lesion": "Generates a lesion inside the mask segment. Draw the mask below first.",
    "inpaint": "Repaints the inside of the mask segment with a lesion or with healthy tissue.",
}


class Region(Enum):
    auto = "auto"
    head_neck = "head_neck"
    chest = "chest"
    abdomen = "abdomen"

    def label(self):
        return {"auto": _("Auto (guess from image)"), "head_neck": _("Head and neck"), "chest": _("Chest"),
                "abdomen": _("Abdomen")}[self.value]


class Device(Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"

    def label(self):
        return {"auto": _("Auto (GPU if available)"), "cuda": _("GPU (CUDA)"), "cpu": _("CPU")}[self.value]


class Precision(Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    def label(self):
        return {"auto": _("Auto"), "fp32": _("float32"), "bf16": _("bfloat16"), "fp16": _("float16")}[self.value]


class InpaintContent(Enum):
    lesion = "lesion"
    healthy = "healthy"

    def label(self):
        return {"lesion": _("Lesion"), "healthy": _("Healthy tissue")}[self.value]


# Parameter-node field -> library parameter name.
PARAMETER_NAMES = {
    "steps": "steps",
    "strength": "strength",
    "noiseLevel": "noise_level",
    "noiseFraction": "noise_fraction",
    "inpaintContent": "content",
    "seed": "seed",
    "windowSize": "window",
    "overlap": "overlap",
    "batchSize": "batch_size",
    "precision": "precision",
}
# Library parameters each task takes (of those the panel offers). Checked against
# MedDiffFMLib.tasks.TASK_PARAMS by the tests; used so the panel works before torch is installed.
_SAMPLING = {"steps", "seed", "window", "overlap", "batch_size", "precision"}
TASK_PARAMETERS = {
    "denoise": _SAMPLING | {"strength", "noise_level"},
    "anomaly": _SAMPLING | {"noise_fraction"},
    "synthesize": set(_SAMPLING),
    "superres": _SAMPLING | {"noise_fraction"},
    "lesion": _SAMPLING | {"noise_fraction"},
    "inpaint": _SAMPLING | {"content"},
}
# Defaults applied when the task changes (the library's defaults for these tasks).
TASK_DEFAULTS = {
    "denoise": {"steps": 2, "strength": 1.0, "noiseLevel": 0.0},
    "anomaly": {"steps": 20, "noiseFraction": 0.95},
    "synthesize": {"steps": 20},
    "superres": {"steps": 20, "noiseFraction": 0.6},
    "lesion": {"steps": 20, "noiseFraction": 1.0},
    "inpaint": {"steps": 20, "inpaintContent": "lesion"},
}
MASK_TASKS = ("lesion", "inpaint")
# Panel rows (label, editor) of each task option, shown only for the tasks that use it.
OPTION_WIDGETS = {
    "steps": ("stepsLabel", "stepsSpinBox"),
    "strength": ("strengthLabel", "strengthSliderWidget"),
    "noiseLevel": ("noiseLevelLabel", "noiseLevelSpinBox"),
    "noiseFraction": ("noiseFractionLabel", "noiseFractionSliderWidget"),
    "inpaintContent": ("inpaintContentLabel", "inpaintContentComboBox"),
    "seed": ("seedLabel", "seedSpinBox"),
    "windowSize": ("windowSizeLabel", "windowSizeSpinBox"),
    "overlap": ("overlapLabel", "overlapSliderWidget"),
    "batchSize": ("batchSizeLabel", "batchSizeSpinBox"),
    "precision": ("precisionLabel", "precisionComboBox"),
}
MASK_WIDGETS = ("maskSegmentationLabel", "maskSegmentationSelector", "maskSegmentLabel", "maskSegmentComboBox",
                "maskEditorCollapsibleButton")
CONTROLNET_TASKS = {"superres": "superres", "lesion": "lesion", "inpaint": "lesion"}
SEGMENTATION_TASKS = ("anomaly", "lesion", "inpaint")


#
# MedDiffFM
#


class MedDiffFM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedDiffFM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedDiffFM contributors"]
        self.parent.helpText = _("""
A 3D CT diffusion foundation model for six tasks: denoising, anomaly detection, CT synthesis,
super-resolution, lesion generation and inpainting. Choose the input CT and a task, adjust the few
options the task shows, and press Apply; the results appear as new nodes in the input's study.
The first Apply installs PyTorch and MONAI (a few minutes, once).
See the <a href="https://github.com/MedDiffFM/SlicerMedDiffFM#3d-slicer">documentation</a>.
<br><br>Research use only: outputs are generated images, not measurements, and are not for diagnosis.
""")
        self.parent.acknowledgementText = _("""
The method follows MedDiff-FM, a diffusion-based foundation model for versatile medical image
applications. Built on PyTorch and MONAI; the background processing and model handling follow the
patterns of the MONAIAuto3DSeg and TotalSegmentator Slicer extensions.
""")


#
# MedDiffFMParameterNode
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
    showResult - show the outputs in the slice views.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    task: Task = Task.denoise
    region: Region = Region.auto
    anatomySegmentation: vtkMRMLSegmentationNode
    maskSegmentation: vtkMRMLSegmentationNode
    steps: Annotated[int, WithinRange(1, 1000)] = 10
    strength: Annotated[float, WithinRange(0.0, 3.0)] = 1.0
    noiseLevel: Annotated[float, WithinRange(0.0, 500.0)] = 0.0
    noiseFraction: Annotated[float, WithinRange(0.05, 1.0)] = 0.95
    inpaintContent: InpaintContent = InpaintContent.lesion
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    windowSize: Annotated[int, WithinRange(0, 512)] = 0
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.25
    batchSize: Annotated[int, WithinRange(1, 64)] = 4
    precision: Precision = Precision.auto
    device: Device = Device.auto
    outputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    showResult: bool = True


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
# MedDiffFMWidget
#


class MedDiffFMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the running job (MedDiffFMJob) or None
        self._lastTask = None
        self._environmentThread = None
        self._environmentInfo = None
        self._pollTimer = None
        self._observedMaskNode = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDiffFM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = MedDiffFMLogic()
        self.logic.applyModelsDirectorySetting()

        # Embedded segment editor to draw the mask
        editor = self.ui.maskSegmentEditorWidget
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setMRMLSegmentEditorNode(self.logic.getSegmentEditorNode())
        editor.setSegmentationNodeSelectorVisible(False)
        if hasattr(editor, "setSourceVolumeNodeSelectorVisible"):
            editor.setSourceVolumeNodeSelectorVisible(False)
        else:  # Slicer < 5.2
            editor.setMasterVolumeNodeSelectorVisible(False)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.maskSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMaskSegmentationChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.controlNetComboBox.connect("currentIndexChanged(int)", self.onControlNetChanged)
        self.ui.modelsDirectoryPathLineEdit.currentPath = str(self.logic.modelsDirectory())
        self.ui.modelsDirectoryPathLineEdit.connect("currentPathChanged(QString)", self.onModelsDirectoryChanged)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self.onPollJob)

        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.setValue(0)
        self.ui.progressBar.setVisible(False)
        self.populateModelCombos()
        self.initializeParameterNode()
        self.refreshEnvironmentInfo()

    def cleanup(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self._run = None
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._run.cancel()
            self._finishJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[MedDiffFMParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with the "SlicerParameterName" property in the .ui file are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    # -- panel state -----------------------------------------------------------------------

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        task = self._parameterNode.task.value
        previousTask, self._lastTask = self._lastTask, task
        if task != previousTask:
            self.populateControlNetCombo(CONTROLNET_TASKS.get(task))
            if previousTask is not None:
                self.applyTaskDefaults(task)  # modifies the node: re-enters this method once
        self.updateTaskOptionsVisibility(task)
        self.updateMaskSegments()
        self._checkCanApply()

    def applyTaskDefaults(self, task: str) -> None:
        for field, value in TASK_DEFAULTS.get(task, {}).items():
            if field == "inpaintContent":
                value = InpaintContent(value)
            setattr(self._parameterNode, field, value)

    def updateTaskOptionsVisibility(self, task: str) -> None:
        """Show only the options the task uses."""
        used = TASK_PARAMETERS[task]
        for field, names in OPTION_WIDGETS.items():
            visible = PARAMETER_NAMES[field] in used
            for name in names:
                getattr(self.ui, name).setVisible(visible)
        needsMask = task in MASK_TASKS
        for name in MASK_WIDGETS:
            getattr(self.ui, name).setVisible(needsMask)
        hasSegmentation = task in SEGMENTATION_TASKS
        self.ui.outputSegmentationLabel.setVisible(hasSegmentation)
        self.ui.outputSegmentationSelector.setVisible(hasSegmentation)
        usesControlNet = task in CONTROLNET_TASKS
        self.ui.controlNetLabel.setVisible(usesControlNet)
        self.ui.controlNetComboBox.setVisible(usesControlNet)
        self.ui.taskDescriptionLabel.text = _(TASK_DESCRIPTIONS[task])

    def updateMaskSegments(self) -> None:
        combo = self.ui.maskSegmentComboBox
        segmentationNode = self._parameterNode.maskSegmentation if self._parameterNode else None
        current = combo.currentData
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        if segmentationNode:
            segmentation = segmentationNode.GetSegmentation()
            for n in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(n)
                combo.addItem(segmentation.GetSegment(segmentId).GetName(), segmentId)
            index = combo.findData(current) if current else -1
            combo.setCurrentIndex(index if index >= 0 else 0)
        combo.blockSignals(wasBlocked)

    def onMaskSegmentationChanged(self, node) -> None:
        editor = self.ui.maskSegmentEditorWidget
        editor.setSegmentationNode(node)
        inputVolume = self._parameterNode.inputVolume if self._parameterNode else None
        if node is not None and inputVolume is not None:
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(inputVolume)
            else:
                editor.setMasterVolumeNode(inputVolume)
            if node.GetSegmentation().GetNumberOfSegments() == 0:
                node.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
                node.CreateDefaultDisplayNodes()
                node.GetSegmentation().AddEmptySegment("mask", "mask", [0.95, 0.75, 0.1])
        if self._observedMaskNode is not None:
            self.removeObserver(self._observedMaskNode, vtk.vtkCommand.ModifiedEvent, self.onMaskSegmentationModified)
        self._observedMaskNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.onMaskSegmentationModified)
        self.updateMaskSegments()

    def onMaskSegmentationModified(self, caller=None, event=None) -> None:
        self.updateMaskSegments()
        self._checkCanApply()

    def onInputVolumeChanged(self, node) -> None:
        editor = self.ui.maskSegmentEditorWidget
        if node is not None and self._parameterNode and self._parameterNode.maskSegmentation:
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(node)
            else:
                editor.setMasterVolumeNode(node)

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._run is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running task (nothing is added to the scene)")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Apply")
        node = self._parameterNode
        reason = None
        if not node or not node.inputVolume:
            reason = _("Select an input volume")
        elif node.task.value in MASK_TASKS and (not node.maskSegmentation or self.ui.maskSegmentComboBox.count == 0):
            reason = _("Select or draw a mask segment")
        elif self.ui.modelComboBox.count == 0:
            reason = _("No model weights are installed: use 'Import weights…' in Advanced")
        self.ui.applyButton.enabled = reason is None
        self.ui.applyButton.toolTip = reason or _("Run the task")

    # -- models --------------------------------------------------------------------------------

    def populateModelCombos(self) -> None:
        from MedDiffFMLib import weights

        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        try:
            models = weights.list_models()
        except weights.WeightsError as e:
            self.appendLog(_("Model registry error: {e}").format(e=e))
            models = []
        for m in models:
            if m.kind == "base" and m.available:
                combo.addItem(m.label(), m.id)
                combo.setItemData(combo.count - 1, m.description or m.id, qt.Qt.ToolTipRole)
        missing = [m.id for m in models if m.kind == "base" and not m.available]
        if missing:
            self.ui.importWeightsButton.toolTip = _("Registered but not installed: {ids}").format(ids=", ".join(missing))
        saved = qt.QSettings().value(SETTINGS_MODEL, "")
        index = combo.findData(saved) if saved else -1
        if index < 0:
            default = weights.default_model_id()
            index = combo.findData(default) if default else -1
        combo.setCurrentIndex(max(index, 0) if combo.count else -1)
        combo.blockSignals(wasBlocked)
        if self._parameterNode:
            self.populateControlNetCombo(CONTROLNET_TASKS.get(self._parameterNode.task.value))

    def populateControlNetCombo(self, task: Optional[str]) -> None:
        from MedDiffFMLib import weights

        combo = self.ui.controlNetComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Default for the task"), "")
        if task:
            try:
                models = weights.list_models()
            except weights.WeightsError:
                models = []
            for m in models:
                if m.kind == "controlnet" and m.task == task and m.available:
                    combo.addItem(m.label(), m.id)
        saved = qt.QSettings().value(SETTINGS_CONTROLNET, "")
        index = combo.findData(saved) if saved else 0
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(wasBlocked)

    def onModelChanged(self, index) -> None:
        qt.QSettings().setValue(SETTINGS_MODEL, self.ui.modelComboBox.currentData or "")
        self._checkCanApply()

    def onControlNetChanged(self, index) -> None:
        qt.QSettings().setValue(SETTINGS_CONTROLNET, self.ui.controlNetComboBox.currentData or "")

    def onModelsDirectoryChanged(self, path) -> None:
        self.logic.setModelsDirectory(path)
        self.populateModelCombos()
        self._checkCanApply()

    def onImportWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Import MedDiffFM weights"), "",
            _("Model archive (*.zip);;Model config (config.json)"))
        if not path:
            return
        if os.path.basename(path) == "config.json":
            path = os.path.dirname(path)
        with slicer.util.tryWithErrorDisplay(_("Importing the weights failed."), waitCursor=True):
            target = self.logic.importWeights(path)
            self.appendLog(_("Imported weights into {path}").format(path=target))
            self.populateModelCombos()
            index = self.ui.modelComboBox.findData(os.path.basename(str(target)))
            if index >= 0:
                self.ui.modelComboBox.setCurrentIndex(index)
        self._checkCanApply()

    # -- environment -----------------------------------------------------------------------

    def refreshEnvironmentInfo(self) -> None:
        """torch version, device and free GPU memory, queried in the worker interpreter."""
        if importlib.util.find_spec("torch") is None:
            self.ui.environmentLabel.text = _("PyTorch is not installed yet; it is installed on the first Apply.")
            return
        import threading

        self.ui.environmentLabel.text = _("Checking PyTorch and the GPU…")
        device = self._parameterNode.device.value if self._parameterNode else "auto"

        def query():
            try:
                self._environmentInfo = self.logic.queryEnvironment(device)
            except Exception as e:
                self._environmentInfo = {"torch": None, "error": str(e)}

        self._environmentThread = threading.Thread(target=query, daemon=True)
        self._environmentThread.start()
        qt.QTimer.singleShot(500, self._showEnvironmentInfo)

    def _showEnvironmentInfo(self) -> None:
        if self._environmentThread is not None and self._environmentThread.is_alive():
            qt.QTimer.singleShot(500, self._showEnvironmentInfo)
            return
        info = self._environmentInfo or {}
        if not info.get("torch"):
            self.ui.environmentLabel.text = _("PyTorch: not available ({error})").format(error=info.get("error", "?"))
            return
        text = _("PyTorch {version} · device: {device}").format(version=info["torch"], device=info.get("device"))
        if info.get("gpu_name"):
            text += _(" ({name}) · free GPU memory: {free:.1f} of {total:.1f} GB").format(
                name=info["gpu_name"], free=info.get("gpu_free_gb") or 0.0, total=info.get("gpu_total_gb") or 0.0)
        elif not info.get("cuda"):
            text += _(" · no CUDA GPU found: tasks run on the CPU (slow)")
        self.ui.environmentLabel.text = text

    # -- running -------------------------------------------------------------------------------

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def onApplyButton(self) -> None:
        if self._run is not None:
            self.appendLog(_("Cancelling…"))
            self._run.cancel()
            self._finishJob()
            return
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the task."), waitCursor=True):
            self.logic.ensureDependencies()
            self.ui.logTextEdit.clear()
            task = node.task.value
            params = self.logic.parametersFromNode(node)
            maskSegmentId = self.ui.maskSegmentComboBox.currentData if task in MASK_TASKS else None
            self._run = self.logic.start(
                node.inputVolume, task, params=params, region=node.region.value,
                anatomySegmentation=node.anatomySegmentation,
                maskSegmentation=node.maskSegmentation if task in MASK_TASKS else None,
                maskSegmentId=maskSegmentId, model=self.ui.modelComboBox.currentData or None,
                controlnet=(self.ui.controlNetComboBox.currentData or None) if task in CONTROLNET_TASKS else None,
                device=node.device.value, outputVolume=node.outputVolume,
                outputSegmentation=node.outputSegmentation if task in SEGMENTATION_TASKS else None,
                onProgress=self.onProgress, onLog=self.appendLog, filterParams=True)
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.setVisible(True)
            self.ui.progressLabel.text = _("Starting…")
            self._pollTimer.start()
        self._checkCanApply()

    def onProgress(self, progress) -> None:
        self.ui.progressBar.setValue(int(round(1000 * max(0.0, min(1.0, progress.fraction or 0.0)))))
        self.ui.progressLabel.text = formatProgress(progress)

    def onPollJob(self) -> None:
        if self._run is None:
            self._pollTimer.stop()
            return
        if self._run.poll():
            return
        run = self._run
        self._finishJob()
        from MedDiffFMLib.tasks.base import Cancelled
        from MedDiffFMLib.worker import WorkerError, WorkerOutOfMemory

        try:
            outputs = self.logic.finish(run)
        except Cancelled:
            self.appendLog(_("Cancelled: nothing was added to the scene."))
            return
        except WorkerOutOfMemory as e:
            self.appendLog(e.message)
            if slicer.util.confirmYesNoDisplay(
                    _("The GPU ran out of memory even with batch size 1.\n\nSwitch the device to CPU? "
                      "(It works on any computer but is much slower.)"), windowTitle=_("MedDiffFM")):
                self._parameterNode.device = Device.cpu
            return
        except WorkerError as e:
            self.appendLog(e.log)
            slicer.util.errorDisplay(_("The task failed: {message}").format(message=e.message), detailedText=e.log)
            return
        except Exception as e:
            logging.exception("MedDiffFM result import failed")
            slicer.util.errorDisplay(_("Adding the results to the scene failed: {e}").format(e=e))
            return
        self.ui.progressLabel.text = run.summary or _("Done")
        if self._parameterNode and self._parameterNode.showResult:
            self.logic.showResults(run.inputVolume, outputs)

    def _finishJob(self) -> None:
        self._run = None
        self._pollTimer.stop()
        self.ui.progressBar.setVisible(False)
        self._checkCanApply()


#
# MedDiffFMJob: one running task (what the widget polls)
#


class MedDiffFMJob:
    """A task running in the worker process, with what is needed to turn its result into nodes."""

    def __init__(self, client, inputVolume, task, params, outputVolume=None, outputSegmentation=None):
        self.client = client
        self.inputVolume = inputVolume
        self.task = task
        self.params = params
        self.outputVolume = outputVolume
        self.outputSegmentation = outputSegmentation
        self.summary = ""
        self.startTime = time.time()

    def poll(self) -> bool:
        return self.client.poll()

    def cancel(self) -> None:
        self.client.cancel()


#
# MedDiffFMLogic
#


class MedDiffFMLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable from the Python console without it.

    Example (batch loop)::

        logic = slicer.util.getModuleLogic("MedDiffFM")
        outputs = logic.process(volumeNode, task="denoise", steps=10)
        outputs["denoised"]  # the new volume node
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._dependenciesChecked = False

    def getParameterNode(self):
        return MedDiffFMParameterNode(super().getParameterNode())

    def getSegmentEditorNode(self):
        node = slicer.mrmlScene.GetSingletonNode("MedDiffFM", "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag("MedDiffFM")
            node = slicer.mrmlScene.AddNode(node)
        return node

    # -- settings and weights ----------------------------------------------------------------

    def modelsDirectory(self) -> str:
        from MedDiffFMLib import weights

        saved = qt.QSettings().value(SETTINGS_MODELS_DIRECTORY, "")
        return saved or str(weights.cache_dir())

    def setModelsDirectory(self, path: str) -> None:
        qt.QSettings().setValue(SETTINGS_MODELS_DIRECTORY, path or "")
        self.applyModelsDirectorySetting()

    def applyModelsDirectorySetting(self) -> None:
        """The library (and the worker) read the cache folder from MEDDIFFFM_MODELS_DIR."""
        from MedDiffFMLib import weights

        saved = qt.QSettings().value(SETTINGS_MODELS_DIRECTORY, "")
        if saved:
            os.environ[weights.ENV_MODELS_DIR] = saved

    def importWeights(self, path: str):
        from MedDiffFMLib import weights

        self.applyModelsDirectorySetting()
        return weights.import_weights(path)

    # -- dependencies --------------------------------------------------------------------------

    def requirementsPath(self) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")

    def requirements(self) -> list:
        with open(self.requirementsPath(), encoding="utf-8") as f:
            return [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Install PyTorch (through the PyTorch extension when present) and the other packages.
        Called on the first Apply, never when the module loads."""
        if self._dependenciesChecked:
            return
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=askConfirmation, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
                if torch is None:
                    raise RuntimeError(_("MedDiffFM needs PyTorch. Install it with the PyTorch Utils module."))
            else:
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                        _("MedDiffFM needs PyTorch, which will be downloaded and installed now (several minutes). "
                          "For GPU support, install the 'PyTorch' extension first and restart.")):
                    raise RuntimeError(_("PyTorch installation was cancelled."))
                slicer.util.pip_install(f"torch>={MINIMUM_TORCH_VERSION}")
        requirements = self.requirements()
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):  # Slicer 5.12+
            packaging.pip_ensure(requirements, requester="MedDiffFM", prompt_install=askConfirmation)
        else:
            modules = {"monai": "monai", "safetensors": "safetensors", "nibabel": "nibabel",
                       "simpleitk": "SimpleITK", "scipy": "scipy", "tqdm": "tqdm"}
            for requirement in requirements:
                name = requirement.split(">")[0].split("=")[0].split("<")[0].strip()
                module = modules.get(name.lower(), name)
                if importlib.util.find_spec(module) is None:
                    slicer.util.pip_install(requirement)
        self._dependenciesChecked = True

    # -- running -------------------------------------------------------------------------------

    def workerSettings(self):
        """(python executable, PYTHONPATH entries, extra environment) for the worker process."""
        from MedDiffFMLib import weights

        python = shutil.which("PythonSlicer") or sys.executable
        libraryParent = os.path.dirname(os.path.dirname(os.path.abspath(
            importlib.util.find_spec("MedDiffFMLib").origin)))
        env = {weights.ENV_MODELS_DIR: self.modelsDirectory()}
        return python, [libraryParent], env

    def queryEnvironment(self, device: str = "auto", timeout: float = 180.0) -> dict:
        """torch version, device and free GPU memory, asked of the worker interpreter (so torch is
        not imported into Slicer's own process just to fill a status line)."""
        import json
        import subprocess

        python, pythonpath, env = self.workerSettings()
        environment = dict(os.environ)
        environment.update(env)
        environment["PYTHONPATH"] = os.pathsep.join(pythonpath + [environment.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        proc = subprocess.run([python, "-m", "MedDiffFMLib.worker", "--info", "--device", device],
                              capture_output=True, text=True, env=environment, timeout=timeout, check=False)
        for line in proc.stdout.splitlines():
            if line.startswith("MEDDIFFFM_INFO "):
                return json.loads(line.partition(" ")[2])
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return {"torch": None, "error": " ".join(tail) or f"exit code {proc.returncode}"}

    def createWorkerClient(self):
        from MedDiffFMLib.worker import WorkerClient

        python, pythonpath, env = self.workerSettings()
        return WorkerClient(python, pythonpath=pythonpath, env=env, work_root=slicer.app.temporaryPath)

    @staticmethod
    def parametersFromNode(parameterNode) -> dict:
        """The library parameters of the parameter node's task (only those the task uses)."""
        task = parameterNode.task.value
        params = {}
        for field, name in PARAMETER_NAMES.items():
            if name not in TASK_PARAMETERS[task]:
                continue
            value = getattr(parameterNode, field)
            params[name] = value.value if isinstance(value, Enum) else value
        return params

    def start(self, inputVolume, task: str, *, params=None, region=None, anatomySegmentation=None,
              maskSegmentation=None, maskSegmentId=None, model=None, controlnet=None, device="auto",
              outputVolume=None, outputSegmentation=None, onProgress=None, onLog=None,
              filterParams=False) -> MedDiffFMJob:
        """Start a task in the worker process; returns at once. Poll the job, then :meth:`finish`.

        ``filterParams``: drop parameters the task does not take (the panel sends its fields; a
        console call is strict, so a typo is reported)."""
        from MedDiffFMSlicer import nodes

        if inputVolume is None:
            raise ValueError(_("Select an input volume."))
        if task in MASK_TASKS and maskSegmentation is None:
            raise ValueError(_("The {task} task needs a mask segment: draw one first.").format(task=task))
        request = nodes.build_request(inputVolume, params=params, region=region,
                                      anatomy_segmentation=anatomySegmentation, mask_segmentation=maskSegmentation,
                                      mask_segment_id=maskSegmentId)
        client = self.createWorkerClient()
        client.start(task, request, model=model, controlnet=controlnet, device=device, on_progress=onProgress,
                     on_log=onLog, filter_params=filterParams)
        return MedDiffFMJob(client, inputVolume, task, request.params, outputVolume, outputSegmentation)

    def finish(self, job: MedDiffFMJob) -> dict:
        """The finished job's outputs as nodes (raises Cancelled / WorkerError; adds nothing then)."""
        from MedDiffFMSlicer import nodes

        result = job.client.result()
        job.summary = result.summary
        outputs = nodes.result_to_nodes(result, job.inputVolume, job.task, params=job.params,
                                        output_volume=job.outputVolume, output_segmentation=job.outputSegmentation)
        for name, value in (result.scores or {}).items():
            logging.info(f"MedDiffFM {job.task} {name}: {value:g}")
        return outputs

    def process(self, inputVolume, task: str = "denoise", *, region=None, anatomySegmentation=None,
                maskSegmentation=None, maskSegmentId=None, model=None, controlnet=None, device="auto",
                outputVolume=None, outputSegmentation=None, inProcess=False, showResult=False, **params) -> dict:
        """Run a task and wait (console and batch use). Returns {output name: new node}.

        ``params`` are the library's task parameters (e.g. ``steps=10, seed=1``). The task runs in
        the worker process unless ``inProcess=True``. Nothing is added to the scene on failure.
        """
        self.ensureDependencies()
        start = time.time()

        def onProgress(progress):
            slicer.app.processEvents()

        job = self.start(inputVolume, task, params=params, region=region, anatomySegmentation=anatomySegmentation,
                         maskSegmentation=maskSegmentation, maskSegmentId=maskSegmentId, model=model,
                         controlnet=controlnet, device=device, outputVolume=outputVolume,
                         outputSegmentation=outputSegmentation, onProgress=onProgress,
                         onLog=logging.info) if not inProcess else None
        if job is None:
            from MedDiffFMSlicer import nodes

            outputs = nodes.process(inputVolume, task, params=params, region=region,
                                    anatomy_segmentation=anatomySegmentation, mask_segmentation=maskSegmentation,
                                    mask_segment_id=maskSegmentId, model=model, controlnet=controlnet,
                                    device=device, output_volume=outputVolume, output_segmentation=outputSegmentation)
        else:
            try:
                while job.poll():
                    time.sleep(0.1)
                outputs = self.finish(job)
            finally:
                job.client.cleanup()
        logging.info(f"MedDiffFM {task} finished in {time.time() - start:.1f} s")
        if showResult:
            self.showResults(inputVolume, outputs)
        return outputs

    @staticmethod
    def showResults(inputVolume, outputs: dict) -> None:
        anomalyMap = outputs.get("anomaly_map")
        volumes = [n for k, n in outputs.items() if n.IsA("vtkMRMLScalarVolumeNode") and k != "anomaly_map"]
        if anomalyMap is not None:
            slicer.util.setSliceViewerLayers(background=inputVolume, foreground=anomalyMap, foregroundOpacity=0.5,
                                             fit=True)
        elif volumes:
            slicer.util.setSliceViewerLayers(background=volumes[0], foreground=inputVolume, foregroundOpacity=0.0,
                                             fit=True)
        for key, node in outputs.items():
            if node.IsA("vtkMRMLSegmentationNode") and node.GetDisplayNode():
                node.GetDisplayNode().SetVisibility(True)


#
# MedDiffFMTest
#


class MedDiffFMTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest): a synthetic oblique CT, the node logic, and a
    real task in the worker process with a tiny randomly initialised model."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_NodeRoundTrip()
        self.setUp()
        self.test_TinyModelDenoise()

    def _syntheticVolume(self):
        import numpy as np

        rng = np.random.default_rng(0)
        kk, jj, ii = np.mgrid[0:12, 0:24, 0:24]
        body = ((jj - 12) ** 2 + (ii - 12) ** 2) < 100
        array = np.where(body, 40, -1000) + rng.normal(0, 20, body.shape)
        ijkToRas = np.array([[-0.9, 0.05, 0.0, 10.0], [0.0, -0.85, 0.1, -20.0], [0.0, 0.0, 2.5, 5.0], [0, 0, 0, 1.0]])
        node = slicer.util.addVolumeFromArray(array.astype(np.int16), ijkToRas, name="SyntheticCT")
        return node, array.astype(np.int16), ijkToRas

    def _requireTorch(self):
        # The library's task package imports torch; without it (e.g. a bare test machine) skip.
        if importlib.util.find_spec("torch") is None:
            self.skipTest("PyTorch is not installed")

    def test_NodeRoundTrip(self):
        import numpy as np

        self._requireTorch()

        from MedDiffFMLib.tasks.base import TaskResult
        from MedDiffFMLib.volume import Volume
        from MedDiffFMSlicer import nodes

        self.delayDisplay("Node round trip")
        node, array, ijkToRas = self._syntheticVolume()
        vol = nodes.volume_from_node(node)
        self.assertTrue(np.array_equal(vol.array, array.astype(np.float32)))
        self.assertTrue(np.allclose(vol.ijk_to_ras, ijkToRas))

        def runner(task, request, model=None, **kwargs):
            image = request.image
            return TaskResult(volumes={"anomaly_map": Volume(np.abs(image.array) / 1000, image.ijk_to_ras)},
                              segmentations={"anomaly": Volume(image.array > 0, image.ijk_to_ras)}, summary="ok")

        outputs = nodes.process(node, "anomaly", runner=runner)
        self.assertEqual(set(outputs), {"anomaly_map", "anomaly_segmentation"})
        self.assertTrue(np.allclose(nodes.ijk_to_ras_of(outputs["anomaly_map"]), ijkToRas))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(node), array))
        self.delayDisplay("Node round trip passed")

    def _tinyModelDirectory(self):
        """A model directory with the library's 'tiny' preset and random weights."""
        import tempfile

        model = os.environ.get("MEDDIFFFM_TEST_MODEL")
        if model:
            return model
        from MedDiffFMLib.checkpoint import save_model
        from MedDiffFMLib.networks import FoundationUNet, preset

        import torch

        torch.manual_seed(0)
        net = FoundationUNet(preset("tiny"))
        directory = os.path.join(tempfile.mkdtemp(prefix="meddifffm-test-", dir=slicer.app.temporaryPath), "tiny")
        save_model(directory, net.cfg, net.state_dict())
        return directory

    def test_TinyModelDenoise(self):
        import numpy as np

        self._requireTorch()
        self.delayDisplay("Denoising a synthetic CT with a tiny model in the worker process")
        logic = MedDiffFMLogic()
        logic.ensureDependencies(askConfirmation=False)
        node, array, ijkToRas = self._syntheticVolume()
        outputs = logic.process(node, "denoise", model=self._tinyModelDirectory(), device="cpu", steps=2)
        denoised = outputs["denoised"]
        self.assertEqual(slicer.util.arrayFromVolume(denoised).shape, array.shape)
        self.assertTrue(np.allclose(slicer.util.arrayFromVolume(node), array))
        self.assertTrue(np.isfinite(slicer.util.arrayFromVolume(denoised)).all())
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        self.assertEqual(shNode.GetItemParent(shNode.GetItemByDataNode(denoised)),
                         shNode.GetItemParent(shNode.GetItemByDataNode(node)))
        self.delayDisplay("Tiny model test passed")
