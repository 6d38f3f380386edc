"""MedDiffFMLib must never need Slicer: no slicer, qt, vtk or ctk import anywhere in the library."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "MedDiffFMLib"
FORBIDDEN = ("slicer", "qt", "vtk", "ctk")

IMPORT_ALL_WITHOUT_SLICER = textwrap.dedent(
    """
    import importlib, importlib.abc, json, pkgutil, sys

    FORBIDDEN = {forbidden!r}

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN or name.split(".")[0].startswith(("vtkmodules", "PythonQt")):
                raise ImportError(f"{{name}} is not available here")
            return None

    sys.meta_path.insert(0, Block())
    for name in FORBIDDEN:
        sys.modules.pop(name, None)

    import MedDiffFMLib

    names = ["MedDiffFMLib"]
    failed = {{}}
    for info in pkgutil.walk_packages(MedDiffFMLib.__path__, "MedDiffFMLib.", onerror=lambda n: failed.setdefault(n, "walk")):
        names.append(info.name)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:
            failed[name] = f"{{type(e).__name__}}: {{e}}"
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    blocked = []
    for name in FORBIDDEN:
        try:
            importlib.import_module(name)
        except ImportError:
            blocked.append(name)
    print(json.dumps({{"imported": names, "failed": failed, "loaded": loaded, "blocked": blocked}}))
    """
).format(forbidden=FORBIDDEN)


def test_every_module_imports_without_slicer_qt_vtk_ctk():
    import json

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL_WITHOUT_SLICER], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["failed"], report["failed"]
    assert not report["loaded"], report["loaded"]
    assert sorted(report["blocked"]) == sorted(FORBIDDEN)  # the blocker really was in force
    imported = set(report["imported"])
    expected = {"MedDiffFMLib." + p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    expected |= {"MedDiffFMLib.tasks." + p.stem for p in (PACKAGE / "tasks").glob("*.py") if p.stem != "__init__"}
    assert expected <= imported, sorted(expected - imported)
    assert {"MedDiffFMLib.tasks", "MedDiffFMLib.networks", "MedDiffFMLib.sampling", "MedDiffFMLib.cli"} <= imported


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__", "optional_import"):
                roots.add(node.args[0].value.split(".")[0])
    return roots


def test_no_file_in_the_library_imports_slicer_qt_vtk_ctk():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    offenders = {str(p.relative_to(REPO)): sorted(r) for p in files
                 if (r := {x for x in _imported_roots(p) if x.lower() in FORBIDDEN or x.startswith("vtkmodules")})}
    assert not offenders, offenders


def test_the_static_check_sees_every_import_form(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import os, slicer\nfrom vtk.util import numpy_support\nimport qt as Qt\n"
                      "def f():\n    import ctk\n    importlib.import_module('vtkmodules.all')\n", encoding="utf-8")
    assert _imported_roots(sample) == {"os", "slicer", "vtk", "qt", "ctk", "vtkmodules"}


INFERENCE_WITHOUT_TRAINING = textwrap.dedent(
    """
    import sys
    import numpy as np
    from MedDiffFMLib.tasks import TaskRequest, run_task
    from MedDiffFMLib.phantoms import make_phantom

    ph = make_phantom("abdomen", shape_kji=(6, 16, 16), spacing_kji=(2.5, 0.8, 0.8), seed=3, noise_hu=15.0,
                      lesions=1)
    for task in ("denoise", "anomaly"):
        run_task(task, TaskRequest(image=ph.volume(), region="abdomen", params={{"steps": 1}}), {model!r},
                 device="cpu")
    loaded = sorted(m for m in sys.modules if m in ("MedDiffFMLib.training", "MedDiffFMLib.finetune"))
    print("LOADED", loaded)
    """
)


def test_inference_never_imports_the_training_code(tiny_model_dir):
    code = INFERENCE_WITHOUT_TRAINING.format(model=str(tiny_model_dir))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LOADED []" in proc.stdout, proc.stdout
