"""Running a task from the panel (Qt): start, the GPU-memory check, progress, cancel, results
into the scene and their display. The work is in ``MedDiffFMSlicer.run`` and the logic."""

import logging

import slicer

from MedDiffFMSlicer import display, run, taskoptions

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    def _(text):
        return text


class RunSection:
    """Mixed into the panel (uses its ``ui``, ``logic``, ``_parameterNode``, ``_job``,
    ``_pollTimer``, ``_segmentList``, ``_environment``, ``_lastOutputs``, ``Device``,
    ``anomalyWidgets``, ``formatProgress``, ``refreshEnvironmentInfo`` and ``_checkCanApply``)."""

    def appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def onApplyButton(self) -> None:
        if self._job is not None:
            self.appendLog(_("Cancelling…"))
            self._job.cancel()
            self._finishJob()
            return
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the task."), waitCursor=True):
            if not self.logic._dependenciesChecked:
                self.logic.ensureDependencies()
                self.refreshEnvironmentInfo()
            from MedDiffFMLib.tasks.registry import task_spec

            self.ui.logTextEdit.clear()
            task = node.task.value
            spec = task_spec(task)
            params = taskoptions.parameters(task, node)
            maskSegmentId = None
            if spec.needs_mask:
                maskSegmentId = self.ui.maskSegmentComboBox.currentData
                if self._segmentList.choose(maskSegmentId) != maskSegmentId:
                    raise ValueError(_("The chosen mask segment no longer exists; choose one again."))
            model = self.ui.modelComboBox.currentData or None
            params, device = self._settingsThatFit(task, params, model, node.device.value)
            self._job = self.logic.start(
                node.inputVolume, task, params=params, region=node.region.value,
                anatomySegmentation=node.anatomySegmentation,
                maskSegmentation=node.maskSegmentation if spec.needs_mask else None,
                maskSegmentId=maskSegmentId, model=model,
                controlnet=(self.ui.controlNetComboBox.currentData or None) if spec.controlnet else None,
                device=device, outputVolume=node.outputVolume,
                outputSegmentation=node.outputSegmentation if spec.primary_segmentation else None,
                onProgress=self.onProgress, onLog=self.appendLog)
            self.appendLog(_("Same run from the Python console:") + "\n" + self._job.command)
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.setVisible(True)
            self.ui.progressLabel.text = _("Starting…")
            self._pollTimer.start()
        self._checkCanApply()

    def _settingsThatFit(self, task, params, model, device):
        """The GPU-memory check: offer settings that fit, or the CPU, instead of a failure.
        Returns the (params, device) to run with."""
        check = run.check_run_memory(self._environment, task, params, model=model, device=device)
        if check.fits:
            return params, device
        self.appendLog(check.advice)
        question = _("Run on the CPU instead?") if check.use_cpu else _("Use these settings?")
        if not slicer.util.confirmYesNoDisplay(check.advice + "\n\n" + question, windowTitle=_("MedDiffFM")):
            return params, device  # as set; the library still halves the batch on out-of-memory
        node = self._parameterNode
        if check.use_cpu:
            node.device = self.Device.cpu
            return params, "cpu"
        node.batchSize, node.windowSize = check.batch_size, check.window
        return {**params, "batch_size": check.batch_size, "window": check.window}, device

    def onProgress(self, progress) -> None:
        self.ui.progressBar.setValue(int(round(1000 * max(0.0, min(1.0, progress.fraction or 0.0)))))
        self.ui.progressLabel.text = self.formatProgress(progress)

    def onPollJob(self) -> None:
        if self._job is None:
            self._pollTimer.stop()
            return
        if self._job.poll():
            if not self._job.client.running:
                self.ui.progressLabel.text = _("Loading the results…")
            return
        job = self._job
        self._finishJob()
        from MedDiffFMLib.tasks.base import Cancelled
        from MedDiffFMLib.worker import WorkerError, WorkerOutOfMemory

        try:
            outputs = job.finish()
        except Cancelled:
            self.appendLog(_("Cancelled: nothing was added to the scene."))
            return
        except WorkerOutOfMemory as e:
            self.appendLog(e.message)
            if slicer.util.confirmYesNoDisplay(
                    _("The GPU ran out of memory even with one window at a time.\n\nSwitch the device to CPU? "
                      "(It works on any computer but is much slower.)"), windowTitle=_("MedDiffFM")):
                self._parameterNode.device = self.Device.cpu
            return
        except WorkerError as e:
            self.appendLog(e.log)
            slicer.util.errorDisplay(_("The task failed: {message}").format(message=e.message), detailedText=e.log)
            return
        except Exception as e:
            logging.exception("MedDiffFM result import failed")
            slicer.util.errorDisplay(_("Adding the results to the scene failed: {e}").format(e=e))
            return
        self.ui.progressLabel.text = (job.summary or _("Done")) + _(" ({t:.0f} s)").format(t=job.elapsed_s)
        self._lastOutputs = outputs
        for name in self.anomalyWidgets:
            getattr(self.ui, name).setVisible("anomaly_map" in outputs)
        if "anomaly_map" in outputs:
            from MedDiffFMSlicer.outputs import anomaly_threshold

            self.ui.anomalyThresholdSliderWidget.value = anomaly_threshold(job.params)
        if self._parameterNode and self._parameterNode.showResult:
            self.logic.showResults(job.input_volume_node, outputs, show3D=self._parameterNode.show3D)

    def _finishJob(self) -> None:
        self._job = None
        self._pollTimer.stop()
        self.ui.progressBar.setVisible(False)
        self._checkCanApply()

    def onShow3D(self, checked: bool) -> None:
        for node in self._lastOutputs.values():
            if node.GetScene() is not None and node.IsA("vtkMRMLSegmentationNode"):
                display.show_in_3d(node, checked)

    def onAnomalyThreshold(self, value: float) -> None:
        node = self._lastOutputs.get("anomaly_map")
        if node is not None and node.GetScene() is not None:
            display.set_anomaly_threshold(node, value)
