"""Extension packaging: CMake lists every file that must ship, the self-test is registered, and the
extension description files agree with each other and with the catalog schema."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "MedDiffFM"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"
IGNORED_PARTS = {"__pycache__", ".pytest_cache"}


def cmake_text(path: Path) -> str:
    """CMake source without comments."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())


def cmake_list(text: str, variable: str) -> list[str]:
    m = re.search(r"set\(\s*" + re.escape(variable) + r"\s+(.*?)\)", text, re.S)
    assert m, f"set({variable} ...) not found"
    module_name = re.search(r"set\(\s*MODULE_NAME\s+(\w+)\s*\)", text).group(1)
    return [item.replace("${MODULE_NAME}", module_name) for item in m.group(1).split()]


def files_under(folder: Path, base: Path, suffix: str | None = None, exclude_suffix: str | None = None) -> set[str]:
    out = set()
    for p in folder.rglob("*"):
        if not p.is_file() or IGNORED_PARTS & set(p.parts) or p.suffix == ".pyc":
            continue
        if suffix is not None and p.suffix != suffix:
            continue
        if exclude_suffix is not None and p.suffix == exclude_suffix:
            continue
        out.add(p.relative_to(base).as_posix())
    return out


def test_top_level_cmake_declares_the_extension():
    text = cmake_text(TOP_CMAKE)
    assert re.search(r"project\(\s*MedDiffFM\s*\)", text)
    assert re.search(r'set\(\s*EXTENSION_DEPENDS\s+"?PyTorch"?\s*\)', text)
    assert re.search(r"add_subdirectory\(\s*MedDiffFM\s*\)", text)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL"):
        assert re.search(r"set\(\s*" + var + r'\s+"[^"]+"\s*\)', text), var
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in text and "Slicer_EXTENSION_CPACK" in text


def test_self_test_is_registered():
    text = cmake_text(MODULE_CMAKE)
    assert re.search(r"set\(\s*MODULE_NAME\s+MedDiffFM\s*\)", text)
    m = re.search(r"if\(\s*BUILD_TESTING\s*\)(.*?)endif\(", text, re.S)
    assert m and re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py\s*\)", m.group(1))
    # the module finds its test class by name in MedDiffFM.py's namespace
    assert "from MedDiffFMQt.selftest import MedDiffFMTest" in (MODULE_DIR / "MedDiffFM.py").read_text(encoding="utf-8")
    selftest = (MODULE_DIR / "MedDiffFMQt" / "selftest.py").read_text(encoding="utf-8")
    assert "class MedDiffFMTest(ScriptedLoadableModuleTest)" in selftest
    assert "skipTest" not in selftest  # "Reload and Test" calls runTest() directly: a SkipTest would fail it


def test_nothing_is_globbed():
    for path in (TOP_CMAKE, MODULE_CMAKE):
        assert not re.search(r"file\(\s*GLOB", cmake_text(path), re.I), path


def test_every_module_file_is_listed_and_exists():
    text = cmake_text(MODULE_CMAKE)
    scripts = cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MODULE_PYTHON_RESOURCES")
    on_disk_py = files_under(MODULE_DIR, MODULE_DIR, suffix=".py")
    assert set(scripts) == on_disk_py, (f"not listed: {on_disk_py - set(scripts)}; "
                                        f"listed but missing: {set(scripts) - on_disk_py}")
    on_disk_res = files_under(MODULE_DIR / "Resources", MODULE_DIR)
    assert set(resources) == on_disk_res, (f"not listed: {on_disk_res - set(resources)}; "
                                           f"listed but missing: {set(resources) - on_disk_res}")
    other = files_under(MODULE_DIR, MODULE_DIR) - on_disk_py - on_disk_res - {"CMakeLists.txt"}
    assert not other, f"files in MedDiffFM/ that are neither scripts nor resources: {other}"


def test_every_library_file_is_listed_and_exists():
    text = cmake_text(MODULE_CMAKE)
    scripts = cmake_list(text, "MEDDIFFFM_LIBRARY_PYTHON_SCRIPTS")
    resources = cmake_list(text, "MEDDIFFFM_LIBRARY_RESOURCES")
    lib_py = files_under(ROOT / "MedDiffFMLib", ROOT, suffix=".py")
    assert set(scripts) == lib_py, (f"not listed: {sorted(lib_py - set(scripts))}; "
                                    f"listed but missing: {sorted(set(scripts) - lib_py)}")
    # package data (e.g. JSON next to the code) and everything under the top-level Resources/
    data = files_under(ROOT / "MedDiffFMLib", ROOT, exclude_suffix=".py") | files_under(ROOT / "Resources", ROOT)
    assert set(resources) == data, (f"not listed: {sorted(data - set(resources))}; "
                                    f"listed but missing: {sorted(set(resources) - data)}")
    assert "Resources/models.json" in resources
    assert re.search(r"SOURCE_DIR\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}/\.\.", text)


INDEX_ENTRY = ROOT / "ExtensionsIndex" / "MedDiffFM.json"
CONTRIBUTORS = re.compile(r"^[^(),]+ \([^()]+\)(, [^(),]+ \([^()]+\))*$")  # "Name (Organization), ..."


def test_catalog_entry_follows_the_schema_and_matches_the_s4ext():
    """What Slicer/ExtensionsIndex's scripts/check_description_files.py checks without network:
    the schema's keys and types, LF line endings, the file name = the CMake project name, the
    extension and repository names, the URL scheme; plus agreement with the .s4ext."""
    raw = INDEX_ENTRY.read_bytes()
    assert b"\r" not in raw, "the index accepts LF line endings only"
    entry = json.loads(raw.decode("utf-8"))
    # slicer-extension-catalog-entry-schema-v1.0.2 (Slicer/ExtensionsIndex schemas/)
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.2.json#")
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    assert set(entry) <= allowed
    assert {"$schema", "category", "scm_url"} <= set(entry)
    assert isinstance(entry["build_dependencies"], list) and all(isinstance(d, str) for d in entry["build_dependencies"])
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5
    assert entry.get("scm_type", "git") in ("git", "local")
    top = cmake_text(TOP_CMAKE)
    project = re.search(r"project\(\s*([^\s)]+)", top).group(1)
    assert INDEX_ENTRY.stem == project and not project.lower().startswith("slicer")
    assert entry["scm_url"].startswith("https://")
    assert entry["scm_url"].rstrip("/").split("/")[-1].startswith("Slicer")  # the repository's name
    s4ext = {}
    for line in (ROOT / "MedDiffFM.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            s4ext[key] = value.strip()
    assert s4ext["scmurl"] == entry["scm_url"] and s4ext["scmrevision"] == entry["scm_revision"]
    assert s4ext["depends"].split() == entry["build_dependencies"] == ["PyTorch"]
    assert s4ext["category"] == entry["category"]
    assert re.search(r'EXTENSION_CATEGORY\s+"' + re.escape(entry["category"]) + '"', top)
    assert re.search(r'EXTENSION_HOMEPAGE\s+"' + re.escape(s4ext["homepage"]) + '"', top)
    contributors = re.search(r'EXTENSION_CONTRIBUTORS\s+"([^"]+)"', top).group(1)
    assert CONTRIBUTORS.match(contributors) and s4ext["contributors"] == contributors
    module = (MODULE_DIR / "MedDiffFM.py").read_text(encoding="utf-8")
    assert f'self.parent.contributors = ["{contributors}"]' in module


def test_license_and_the_owed_screenshots_are_stated():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert re.search(r'license\s*=\s*\{text\s*=\s*"Apache-2.0"\}', (ROOT / "pyproject.toml").read_text())
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    screenshots = re.search(r'EXTENSION_SCREENSHOTURLS\s+"([^"]*)"', cmake_text(TOP_CMAKE)).group(1)
    if not screenshots:  # the index refuses an empty list; the README must say why it is empty
        assert "Screenshots are still owed" in readme
