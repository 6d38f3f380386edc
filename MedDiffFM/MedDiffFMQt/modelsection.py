"""The model choice and the small model manager of the panel (Qt): the installed models with size,
SHA-256 and folder, import, remove, show the folder. The work is in ``MedDiffFMSlicer.models``."""

import qt

import slicer

from MedDiffFMSlicer import models

try:
    from slicer.i18n import tr as _
except ImportError:  # Slicer < 5.4
    def _(text):
        return text


class ModelSection:
    """Mixed into the panel (uses its ``ui``, ``logic``, ``appendLog``, ``_checkCanApply``)."""

    def populateModels(self) -> None:
        """The model combo box and the installed-models table (id, kind, size, SHA-256, folder)."""
        from MedDiffFMLib import weights

        try:
            installed = models.installed_models()
            defaultId = weights.default_model_id()
        except weights.WeightsError as e:
            self.appendLog(_("Model registry error: {e}").format(e=e))
            installed, defaultId = [], None
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for m in installed:
            if m.kind == "base":
                combo.addItem(m.id, m.id)
        saved = qt.QSettings().value(self.settingsModel, "")
        index = combo.findData(saved) if saved else -1
        if index < 0 and defaultId:
            index = combo.findData(defaultId)
        combo.setCurrentIndex(max(index, 0) if combo.count else -1)
        combo.blockSignals(wasBlocked)
        table = self.ui.modelsTableWidget
        table.setRowCount(len(installed))
        for row, m in enumerate(installed):
            check = {True: _("verified"), False: _("CHECKSUM MISMATCH"), None: _("custom")}[m.verified]
            cells = (m.id, m.kind + (f" ({m.task})" if m.task else ""), f"{m.size_bytes / 2**20:.1f} MB",
                     f"{m.sha256[:12]}… {check}", str(m.location))
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(m.sha256 if column == 3 else text)
                table.setItem(row, column, item)
        self.ui.modelsFolderLabel.text = str(weights.cache_dir())
        if self._parameterNode:
            self.populateControlNetCombo(self._parameterNode.task.value)

    def populateControlNetCombo(self, task: str) -> None:
        from MedDiffFMLib.tasks.registry import task_spec

        combo = self.ui.controlNetComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("Default for the task"), "")
        controlnetTask = task_spec(task).controlnet
        if controlnetTask:
            for m in models.installed_models():
                if m.kind == "controlnet" and m.task == controlnetTask:
                    combo.addItem(m.id, m.id)
        saved = qt.QSettings().value(self.settingsControlNet, "")
        combo.setCurrentIndex(max(combo.findData(saved) if saved else 0, 0))
        combo.blockSignals(wasBlocked)

    def onModelChanged(self, index) -> None:
        qt.QSettings().setValue(self.settingsModel, self.ui.modelComboBox.currentData or "")
        self._checkCanApply()

    def onControlNetChanged(self, index) -> None:
        qt.QSettings().setValue(self.settingsControlNet, self.ui.controlNetComboBox.currentData or "")

    def onModelsDirectoryChanged(self, path) -> None:
        self.logic.setModelsDirectory(path)  # an empty path restores the default folder
        self.populateModels()
        self._checkCanApply()

    def onImportWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Import MedDiffFM weights"), "",
            _("Model archive (*.zip);;Model config (config.json)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Importing the weights failed."), waitCursor=True):
            target = models.import_model(path)
            self.appendLog(_("Imported weights into {path}").format(path=target))
            self.populateModels()
        self._checkCanApply()

    def onRemoveModel(self) -> None:
        row = self.ui.modelsTableWidget.currentRow()
        item = self.ui.modelsTableWidget.item(row, 0) if row >= 0 else None
        if item is None or not slicer.util.confirmYesNoDisplay(
                _("Delete the model {id} from this computer?").format(id=item.text())):
            return
        with slicer.util.tryWithErrorDisplay(_("Removing the model failed.")):
            models.remove_model(item.text())
        self.populateModels()
        self._checkCanApply()

    def onOpenModelsFolder(self) -> None:
        from MedDiffFMLib import weights

        folder = weights.cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

