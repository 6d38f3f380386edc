"""The Qt Designer file against the module code (no Slicer needed: XML + ast).

* every widget the module and its panel touch (``self.ui.<name>`` and the name tables they loop
  over) exists in MedDiffFM.ui with the expected class;
* every field of the parameter node is bound to exactly one widget (``SlicerParameterName``) of a
  class Slicer's parameterNodeWrapper can connect to that type;
* the panel's option rows cover exactly the fields that show task parameters.
(The task facts themselves come from the registry and are not repeated in the module.)
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = ROOT / "MedDiffFM" / "MedDiffFM.py"
QT_FILES = sorted((ROOT / "MedDiffFM" / "MedDiffFMQt").glob("*.py"))
UI = ROOT / "MedDiffFM" / "Resources" / "UI" / "MedDiffFM.ui"

# Every widget the module code touches, with the class it must have.
EXPECTED_CLASSES = {
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "taskComboBox": "QComboBox",
    "taskDescriptionLabel": "QLabel",
    "regionComboBox": "QComboBox",
    "anatomySegmentationSelector": "qMRMLNodeComboBox",
    "maskSegmentationLabel": "QLabel",
    "maskSegmentationSelector": "qMRMLNodeComboBox",
    "maskSegmentLabel": "QLabel",
    "maskSegmentComboBox": "QComboBox",
    "maskEditorCollapsibleButton": "ctkCollapsibleButton",
    "maskSegmentEditorWidget": "qMRMLSegmentEditorWidget",
    "stepsLabel": "QLabel", "stepsSpinBox": "QSpinBox",
    "strengthLabel": "QLabel", "strengthSliderWidget": "ctkSliderWidget",
    "noiseLevelLabel": "QLabel", "noiseLevelSpinBox": "QDoubleSpinBox",
    "noiseFractionLabel": "QLabel", "noiseFractionSliderWidget": "ctkSliderWidget",
    "inpaintContentLabel": "QLabel", "inpaintContentComboBox": "QComboBox",
    "contrastPhaseLabel": "QLabel", "contrastPhaseComboBox": "QComboBox",
    "seedLabel": "QLabel", "seedSpinBox": "QSpinBox",
    "windowSizeLabel": "QLabel", "windowSizeSpinBox": "QSpinBox",
    "overlapLabel": "QLabel", "overlapSliderWidget": "ctkSliderWidget",
    "batchSizeLabel": "QLabel", "batchSizeSpinBox": "QSpinBox",
    "precisionLabel": "QLabel", "precisionComboBox": "QComboBox",
    "deviceComboBox": "QComboBox",
    "modelComboBox": "QComboBox",
    "controlNetLabel": "QLabel", "controlNetComboBox": "QComboBox",
    "importWeightsButton": "QPushButton",
    "removeModelButton": "QPushButton",
    "openModelsFolderButton": "QPushButton",
    "modelsTableWidget": "QTableWidget",
    "modelsFolderLabel": "QLabel",
    "show3DButton": "QPushButton",
    "anomalyThresholdLabel": "QLabel",
    "anomalyThresholdSliderWidget": "ctkSliderWidget",
    "modelsDirectoryPathLineEdit": "ctkPathLineEdit",
    "outputVolumeSelector": "qMRMLNodeComboBox",
    "outputSegmentationLabel": "QLabel", "outputSegmentationSelector": "qMRMLNodeComboBox",
    "showResultCheckBox": "QCheckBox",
    "applyButton": "QPushButton",
    "progressBar": "QProgressBar",
    "progressLabel": "QLabel",
    "logTextEdit": "QPlainTextEdit",
    "environmentLabel": "QLabel",
}

# Widget classes parameterNodeWrapper connects to each field type (Slicer's guiConnectors.py).
CONNECTORS = {
    "int": {"QSpinBox", "QSlider", "ctkSliderWidget", "QDoubleSpinBox", "ctkDoubleSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "qMRMLSliderWidget"},
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton"},
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
    "enum": {"QComboBox", "ctkComboBox"},
    "node": {"qMRMLNodeComboBox"},
}


def ui_widgets() -> dict[str, ET.Element]:
    tree = ET.parse(UI)
    return {w.get("name"): w for w in tree.iter("widget")}


def module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"))


def module_constant(name: str):
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} is not a literal module-level constant of MedDiffFM.py")


def touched_widget_names() -> set[str]:
    names = set()
    trees = [module_tree()] + [ast.parse(p.read_text(encoding="utf-8")) for p in QT_FILES]
    for node in (n for tree in trees for n in ast.walk(tree)):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    for names_tuple in module_constant("OPTION_WIDGETS").values():
        names.update(names_tuple)
    names.update(module_constant("MASK_WIDGETS"))
    names.update(module_constant("ANOMALY_WIDGETS"))
    return names


def parameter_fields() -> dict[str, ast.expr]:
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.ClassDef) and any(
                (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list):
            return {s.target.id: s.annotation for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in MedDiffFM.py")


def enum_classes() -> set[str]:
    """Names bound to ``_LabelledEnum("Name", ...)`` (enums built from the registry's values)."""
    return {t.id for n in module_tree().body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
            and getattr(n.value.func, "id", "") == "_LabelledEnum" for t in n.targets if isinstance(t, ast.Name)}


def field_kind(annotation: ast.expr) -> tuple[str, bool]:
    """('int' | 'float' | 'bool' | 'str' | 'enum' | 'node', bounded)."""
    bounded = False
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
        elts = annotation.slice.elts
        annotation = elts[0]
        bounded = any(isinstance(e, ast.Call) and getattr(e.func, "id", "") == "WithinRange" for e in elts[1:])
    name = getattr(annotation, "id", "")
    if name.startswith("vtkMRML"):
        return "node", bounded
    if name in enum_classes():
        return "enum", bounded
    return name, bounded


def test_ui_file_is_well_formed_and_declares_custom_widgets():
    tree = ET.parse(UI)
    root = tree.getroot()
    assert root.tag == "ui" and root.find("class").text == "MedDiffFM"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "MedDiffFM"
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("qMRML", "ctk", "qSlicer"))}
    assert custom <= declared, f"customwidgets missing: {custom - declared}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    # every MRML widget gets the scene from the top-level widget
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class", "").startswith("qMRML")
            and w.get("class") != "qMRMLWidget"}
    assert mrml <= receivers, f"not connected to the scene: {mrml - receivers}"


def test_every_widget_the_code_touches_exists_with_its_class():
    widgets = ui_widgets()
    touched = touched_widget_names()
    unknown = touched - set(EXPECTED_CLASSES)
    assert not unknown, f"add the expected class of {sorted(unknown)} to EXPECTED_CLASSES"
    missing = sorted(n for n in touched if n not in widgets)
    assert not missing, f"MedDiffFM.ui lacks {missing}"
    wrong = {n: (widgets[n].get("class"), EXPECTED_CLASSES[n]) for n in touched
             if widgets[n].get("class") != EXPECTED_CLASSES[n]}
    assert not wrong, f"widget classes (found, expected): {wrong}"


def test_every_parameter_node_field_is_bound_to_one_compatible_widget():
    bound: dict[str, list[ET.Element]] = {}
    for w in ui_widgets().values():
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                assert p.get("stdset") == "0", "SlicerParameterName must be a dynamic property (stdset=0)"
                bound.setdefault(p.find("string").text, []).append(w)
    fields = parameter_fields()
    assert set(bound) == set(fields), (f"fields without widget: {set(fields) - set(bound)}; "
                                       f"widgets bound to no field: {set(bound) - set(fields)}")
    for name, annotation in fields.items():
        assert len(bound[name]) == 1, f"{name} is bound to {len(bound[name])} widgets"
        cls = bound[name][0].get("class")
        kind, bounded = field_kind(annotation)
        assert cls in CONNECTORS[kind], f"{name} ({kind}) cannot be connected to a {cls}"
        if cls in ("ctkSliderWidget", "QSlider"):
            assert bounded, f"{name}: a {cls} needs a WithinRange annotation"


def test_option_rows_cover_the_task_parameter_fields():
    import sys

    sys.path.insert(0, str(ROOT / "MedDiffFM"))
    from MedDiffFMSlicer import taskoptions

    fields = parameter_fields()
    assert set(taskoptions.PANEL_FIELDS) <= set(fields)
    assert set(module_constant("OPTION_WIDGETS")) == set(taskoptions.PANEL_FIELDS)
    assert {"task", "region", "device", "precision", "inpaintContent", "contrastPhase"} <= {
        name for name, annotation in fields.items() if field_kind(annotation)[0] == "enum"}
