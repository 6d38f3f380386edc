"""The MedDiffFM panel (Qt). It only wires widgets to ``MedDiffFMSlicer``, where the decisions are.

Only the Slicer application can run this file. What it must get right, and where Slicer's own
code shows how (reviewed against Slicer's sources, not run here):

* the embedded Segment Editor follows Slicer's Segment Editor module (``SegmentEditor.py``):
  on enter it installs keyboard shortcuts and view observations, on exit it deactivates the
  effect and removes both, and on scene close it clears its segmentation and observations, so
  it stops painting when the user leaves the module;
* task defaults are applied only when the user picks a task (the combo box's ``activated``
  signal), never when a scene is loaded or the task is set from Python;
* QSettings is read on the main thread only; the environment query thread gets plain values;
* the status line is refreshed after an install and when the device changes.
"""

import threading

import qt
import vtk

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from MedDiffFMSlicer import taskoptions
from MedDiffFMSlicer.segments import SegmentList

from .modelsection import ModelSection
from .runsection import RunSection

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    def _(text):
        return text


class Panel(ScriptedLoadableModuleWidget, VTKObservationMixin, ModelSection, RunSection):
    """Subclassed in MedDiffFM.py, which sets the class attributes below."""

    Logic = None
    Device = None
    optionWidgets: dict = {}
    maskWidgets: tuple = ()
    anomalyWidgets: tuple = ()
    settingsModel = ""
    settingsControlNet = ""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._lastTask = None
        self._environment = {}
        self._environmentThread = None
        self._pollTimer = None
        self._segmentList = None
        self._lastOutputs = {}

    # -- lifecycle (as Slicer's Segment Editor module does it) ---------------------------------

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedDiffFM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.Logic()

        editor = self.ui.maskSegmentEditorWidget
        editor.setMRMLScene(slicer.mrmlScene)
        editor.setMRMLSegmentEditorNode(self.logic.getSegmentEditorNode())
        editor.setSegmentationNodeSelectorVisible(False)
        editor.setSourceVolumeNodeSelectorVisible(False)
        self._segmentList = SegmentList(self.onMaskSegmentsChanged)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.taskComboBox.connect("activated(int)", self.onTaskChosen)  # user choices only
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", lambda i: self.refreshEnvironmentInfo())
        self.ui.maskSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMaskSegmentationChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputVolumeChanged)
        self.ui.maskSegmentComboBox.connect("currentIndexChanged(int)", lambda i: self._checkCanApply())
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.controlNetComboBox.connect("currentIndexChanged(int)", self.onControlNetChanged)
        self.ui.importWeightsButton.connect("clicked(bool)", self.onImportWeights)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.show3DButton.connect("toggled(bool)", self.onShow3D)
        self.ui.anomalyThresholdSliderWidget.connect("valueChanged(double)", self.onAnomalyThreshold)
        self.ui.modelsDirectoryPathLineEdit.currentPath = self.logic.modelsDirectory()
        self.ui.modelsDirectoryPathLineEdit.connect("currentPathChanged(QString)", self.onModelsDirectoryChanged)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self.onPollJob)
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.setVisible(False)
        self.populateModels()
        self.initializeParameterNode()
        self.refreshEnvironmentInfo()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._job = None
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self._segmentList.close()
        self.ui.maskSegmentEditorWidget.uninstallKeyboardShortcuts()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        editor = self.ui.maskSegmentEditorWidget
        editor.installKeyboardShortcuts()
        editor.setupViewObservations()
        editor.updateWidgetFromMRML()

    def exit(self) -> None:
        editor = self.ui.maskSegmentEditorWidget
        editor.setActiveEffect(None)  # no painting once the user has left the module
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()
            self._finishJob()
        self.setParameterNode(None)
        editor = self.ui.maskSegmentEditorWidget
        editor.setActiveEffect(None)
        editor.setSegmentationNode(None)
        editor.removeViewObservations()
        self._segmentList.set_segmentation_node(None)
        self._lastOutputs = {}

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
            editor = self.ui.maskSegmentEditorWidget
            editor.setMRMLSegmentEditorNode(self.logic.getSegmentEditorNode())
            editor.setupViewObservations()
            editor.updateWidgetFromMRML()

    # -- parameter node ------------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = parameterNode
        self._lastTask = None
        if self._parameterNode:
            # Widgets with the "SlicerParameterName" property in the .ui file are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Show what the task uses. Never changes the parameter node (no defaults here)."""
        if not self._parameterNode:
            return
        task = self._parameterNode.task.value
        if task != self._lastTask:
            self._lastTask = task
            self.populateControlNetCombo(task)
        self.updateTaskOptionsVisibility(task)
        self._checkCanApply()

    def onTaskChosen(self, index) -> None:
        if self._parameterNode:
            taskoptions.choose_task(self._parameterNode, self._parameterNode.parameterNode)

    def updateTaskOptionsVisibility(self, task: str) -> None:
        from MedDiffFMLib.tasks.registry import task_spec

        spec = task_spec(task)
        used = set(taskoptions.task_fields(task))
        for field, names in self.optionWidgets.items():
            for name in names:
                getattr(self.ui, name).setVisible(field in used)
        for name in self.maskWidgets:
            getattr(self.ui, name).setVisible(spec.needs_mask)
        hasSegmentation = spec.primary_segmentation is not None
        self.ui.outputSegmentationLabel.setVisible(hasSegmentation)
        self.ui.outputSegmentationSelector.setVisible(hasSegmentation)
        self.ui.controlNetLabel.setVisible(spec.controlnet is not None)
        self.ui.controlNetComboBox.setVisible(spec.controlnet is not None)
        self.ui.taskDescriptionLabel.text = spec.description

    # -- mask segment ----------------------------------------------------------------------------

    def onMaskSegmentationChanged(self, node) -> None:
        editor = self.ui.maskSegmentEditorWidget
        editor.setSegmentationNode(node)
        inputVolume = self._parameterNode.inputVolume if self._parameterNode else None
        if node is not None and inputVolume is not None:
            editor.setSourceVolumeNode(inputVolume)
            if node.GetSegmentation().GetNumberOfSegments() == 0:
                node.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
                node.CreateDefaultDisplayNodes()
                node.GetSegmentation().AddEmptySegment("mask", "mask", [0.95, 0.75, 0.1])
        self._segmentList.set_segmentation_node(node)

    def onMaskSegmentsChanged(self) -> None:
        """Segments were added, renamed, removed or reordered: rebuild the list."""
        combo = self.ui.maskSegmentComboBox
        current = combo.currentData
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for segmentId, name in self._segmentList.segments():
            combo.addItem(name, segmentId)
        chosen = self._segmentList.choose(current)
        combo.setCurrentIndex(combo.findData(chosen) if chosen else -1)
        combo.blockSignals(wasBlocked)
        self._checkCanApply()

    def onInputVolumeChanged(self, node) -> None:
        if node is not None and self._parameterNode and self._parameterNode.maskSegmentation:
            self.ui.maskSegmentEditorWidget.setSourceVolumeNode(node)

    def _checkCanApply(self) -> None:
        if self._job is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running task (nothing is added to the scene)")
            self.ui.applyButton.enabled = True
            return
        from MedDiffFMLib.tasks.registry import task_spec

        self.ui.applyButton.text = _("Apply")
        node = self._parameterNode
        reason = None
        if not node or not node.inputVolume:
            reason = _("Select an input volume")
        elif task_spec(node.task.value).needs_mask and (
                not node.maskSegmentation or self._segmentList.choose(self.ui.maskSegmentComboBox.currentData) is None):
            reason = _("Select or draw a mask segment")
        elif self.ui.modelComboBox.count == 0:
            reason = _("No model weights are installed: use 'Import…' in Advanced")
        self.ui.applyButton.enabled = reason is None
        self.ui.applyButton.toolTip = reason or _("Run the task")

    # -- environment ---------------------------------------------------------------------------

    def refreshEnvironmentInfo(self) -> None:
        """torch version, device and free GPU memory, asked of the worker interpreter on a thread
        (the settings are read here, on the main thread)."""
        from MedDiffFMLib.worker import query_environment

        if self._environmentThread is not None and self._environmentThread.is_alive():
            qt.QTimer.singleShot(500, self.refreshEnvironmentInfo)  # one query at a time
            return
        self.ui.environmentLabel.text = _("Checking PyTorch and the GPU…")
        device = self._parameterNode.device.value if self._parameterNode else "auto"
        settings = self.logic.workerSettings()
        result = {}

        def query():
            result.update(query_environment(settings.python, pythonpath=list(settings.pythonpath),
                                            env=dict(settings.env), device=device))

        self._environmentThread = threading.Thread(target=query, daemon=True)
        self._environmentThread.start()
        self._showEnvironmentWhenDone(result)

    def _showEnvironmentWhenDone(self, result: dict) -> None:
        if self._environmentThread.is_alive():
            qt.QTimer.singleShot(300, lambda: self._showEnvironmentWhenDone(result))
            return
        self._environment = result
        if not result.get("torch"):
            self.ui.environmentLabel.text = _("PyTorch is not installed yet; the first Apply sets it up "
                                              "({error}).").format(error=result.get("error", "?"))
            return
        text = _("PyTorch {version} · device: {device}").format(version=result["torch"], device=result.get("device"))
        if result.get("gpu_name"):
            text += _(" ({name}) · free GPU memory: {free:.1f} of {total:.1f} GB").format(
                name=result["gpu_name"], free=result.get("gpu_free_gb") or 0.0, total=result.get("gpu_total_gb") or 0.0)
        elif not result.get("cuda"):
            text += _(" · no CUDA GPU found: tasks run on the CPU (slow)")
        self.ui.environmentLabel.text = text
