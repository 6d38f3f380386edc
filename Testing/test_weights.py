"""Weights registry, cache, import and verification (standard library only, no torch)."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest

from MedDiffFMLib import weights
from MedDiffFMLib.weights import ModelNotFoundError, WeightsError


def fake_safetensors(path: Path, payload: bytes = b"\x00" * 16) -> None:
    """A minimal valid safetensors file (header + raw bytes); no torch needed."""
    header = json.dumps({"__metadata__": {"format": "test"},
                         "w": {"dtype": "U8", "shape": [len(payload)], "data_offsets": [0, len(payload)]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + payload)


# A valid foundation config.json (every required key; the weights are fake bytes).
BASE_CONFIG = {"kind": "base", "format": "meddiff-fm/1", "name": "tiny", "window": 16, "spacing_range_mm": [0.5, 8.0],
               "channels": [8, 16], "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": 8,
               "norm_num_groups": 8, "coord_frequencies": 2, "num_regions": 3, "anatomy_channels": 14,
               "num_train_timesteps": 1000, "schedule": "cosine"}


def make_model(d: Path, payload: bytes = b"\x01" * 16, **config) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**BASE_CONFIG, **config}), encoding="utf-8")
    fake_safetensors(d / "model.safetensors", payload)
    return d


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """An isolated Resources/ folder and cache."""
    res = tmp_path / "Resources"
    res.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setenv(weights.ENV_RESOURCES_DIR, str(res))
    monkeypatch.setenv(weights.ENV_MODELS_DIR, str(cache))
    return res, cache


def write_registry(res: Path, models: list[dict], default=None) -> None:
    (res / "models.json").write_text(json.dumps({"format_version": 1, "default": default, "models": models}), encoding="utf-8")


def test_cache_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv(weights.ENV_MODELS_DIR, raising=False)
    assert weights.cache_dir() == Path.home() / ".meddifffm" / "models"
    monkeypatch.setenv(weights.ENV_MODELS_DIR, str(tmp_path / "m"))
    assert weights.cache_dir() == tmp_path / "m"


def test_shipped_registry_is_valid():
    """The registry shipped in the repository parses and has no placeholders."""
    path = Path(__file__).resolve().parent.parent / "Resources" / "models.json"
    entries, default = weights.load_registry(path)
    for e in entries:
        assert "TODO" not in json.dumps(e.__dict__, default=str).upper()
        if e.path is not None:
            d = path.parent / e.path
            config = json.loads((d / "config.json").read_text(encoding="utf-8"))
            if "spacing_mm" in config.get("base", {}):
                # a ControlNet trained on a fixed-grid (v1) base: refused with the reason, not loaded
                with pytest.raises(WeightsError, match=r"fixed-grid \(v1"):
                    weights.verify(d, e.sha256)
                continue
            assert weights.verify(d, e.sha256) == e.sha256
    assert default is None or default in {e.id for e in entries}


def test_sha256_file(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert weights.sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_resolve_bundled_cache_path_and_default(env, tmp_path):
    res, cache = env
    bundled = make_model(res / "models" / "demo-base")
    sha = weights.sha256_file(bundled / "model.safetensors")
    write_registry(res, [
        {"id": "demo-base", "version": "1.0.0", "kind": "base", "path": "models/demo-base", "sha256": sha,
         "size": 40, "min_gpu_memory_gb": 2, "description": "demo"},
        {"id": "demo-lesion", "version": "1.0.0", "kind": "controlnet", "task": "lesion", "base": "demo-base",
         "file": "demo-lesion.zip", "sha256": "0" * 64, "min_gpu_memory_gb": 2, "description": "lesion"},
    ])
    assert weights.resolve_model(None) == bundled
    assert weights.resolve_model("demo-base") == bundled
    other = make_model(tmp_path / "elsewhere")
    assert weights.resolve_model(other) == other
    assert weights.resolve_model(str(other)) == other
    # registered but not installed: a clear message that says how to import it
    with pytest.raises(ModelNotFoundError, match="not installed"):
        weights.resolve_model("demo-lesion")
    with pytest.raises(ModelNotFoundError, match="not installed"):
        weights.resolve_model(None, kind="controlnet", task="lesion")
    with pytest.raises(ModelNotFoundError, match="no default"):
        weights.resolve_model(None, kind="controlnet", task="superres")
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        weights.resolve_model("nope")
    with pytest.raises(ModelNotFoundError, match="not a model directory"):
        weights.resolve_model(tmp_path)  # a directory without the two files
    # a custom model imported into the cache is found by its name
    make_model(cache / "my-model")
    assert weights.resolve_model("my-model") == cache / "my-model"
    listed = {m.id: m for m in weights.list_models()}
    assert listed["demo-base"].available and listed["demo-base"].source == "bundled"
    assert not listed["demo-lesion"].available
    assert listed["my-model"].source == "custom" and listed["my-model"].available


def test_empty_registry_has_no_default(env):
    res, _ = env
    write_registry(res, [])
    with pytest.raises(ModelNotFoundError, match="import"):
        weights.resolve_model(None)
    assert weights.list_models() == []


@pytest.mark.parametrize("bad, match", [
    ({"id": "a", "kind": "base", "path": "m", "sha256": "xyz"}, "sha256"),
    ({"id": "a", "kind": "other", "path": "m", "sha256": "0" * 64}, "kind"),
    ({"id": "a", "kind": "controlnet", "path": "m", "sha256": "0" * 64}, "task"),
    ({"id": "a", "kind": "base", "path": "../m", "sha256": "0" * 64}, "relative"),
    ({"id": "a", "kind": "base", "sha256": "0" * 64}, "path"),
    ({"id": "a b", "kind": "base", "path": "m", "sha256": "0" * 64}, "id"),
    ({"id": "a", "kind": "base", "path": "m", "sha256": "0" * 64, "extra": 1}, "unknown"),
])
def test_registry_validation(env, bad, match):
    res, _ = env
    write_registry(res, [bad])
    with pytest.raises(WeightsError, match=match):
        weights.load_registry()


def test_import_zip_verifies_registry_checksum(env, tmp_path):
    res, cache = env
    src = make_model(tmp_path / "src" / "demo-base", payload=b"\x02" * 32)
    sha = weights.sha256_file(src / "model.safetensors")
    write_registry(res, [{"id": "demo-base", "version": "1", "kind": "base", "file": "demo-base.zip",
                          "sha256": sha, "description": ""}])
    archive = tmp_path / "demo-base.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(src / "config.json", "demo-base/config.json")
        zf.write(src / "model.safetensors", "demo-base/model.safetensors")
    got = weights.import_weights(archive)
    assert got == cache / "demo-base"
    assert weights.resolve_model(None) == got
    assert weights.verify(got) == sha
    assert [p.name for p in cache.iterdir()] == ["demo-base"]  # no temp folders left
    # importing again is a no-op that returns the same directory
    assert weights.import_weights(archive) == got


def test_import_renamed_archive_is_recognised_by_checksum(env, tmp_path):
    res, cache = env
    src = make_model(tmp_path / "whatever", payload=b"\x05" * 8)
    sha = weights.sha256_file(src / "model.safetensors")
    write_registry(res, [{"id": "demo-base", "kind": "base", "file": "demo-base.zip", "sha256": sha}])
    archive = tmp_path / "download (1).zip"
    with zipfile.ZipFile(archive, "w") as zf:  # files at the archive root
        zf.write(src / "config.json", "config.json")
        zf.write(src / "model.safetensors", "model.safetensors")
    assert weights.import_weights(archive) == cache / "demo-base"


def test_import_checksum_mismatch_leaves_cache_untouched(env, tmp_path):
    res, cache = env
    write_registry(res, [{"id": "demo-base", "kind": "base", "file": "demo-base.zip", "sha256": "a" * 64}])
    src = make_model(tmp_path / "demo-base")
    with pytest.raises(WeightsError, match="does not match the registry"):
        weights.import_weights(src)
    assert not any(cache.iterdir())


def test_import_refuses_path_traversal_and_symlinks(env, tmp_path):
    _, cache = env
    src = make_model(tmp_path / "m")
    for evil in ("../evil/config.json", "/abs/config.json", "C:/x/config.json", "a/../../config.json"):
        archive = tmp_path / "evil.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            # ZipInfo keeps the name as given (ZipFile.write would sanitise it)
            zf.writestr(zipfile.ZipInfo(evil), (src / "config.json").read_bytes())
            zf.write(src / "model.safetensors", "m/model.safetensors")
        with pytest.raises(WeightsError, match="traversal|outside"):
            weights.import_weights(archive)
    assert not (tmp_path / "evil").exists()
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("m/config.json")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(WeightsError, match="symbolic link"):
        weights.import_weights(link)
    assert not any(cache.iterdir())


def test_import_refuses_pickles_and_non_safetensors(env, tmp_path):
    src = make_model(tmp_path / "m")
    (src / "model.pt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(WeightsError, match="pickle"):
        weights.import_weights(src)
    bad = make_model(tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x80\x04\x95 not a safetensors file at all")
    with pytest.raises(WeightsError, match="safetensors"):
        weights.import_weights(bad)


def test_import_directory_custom_model_and_overwrite(env, tmp_path):
    _, cache = env
    a = make_model(tmp_path / "custom", payload=b"\x01" * 8)
    assert weights.import_weights(a) == cache / "custom"
    b = make_model(tmp_path / "v2" / "custom", payload=b"\x09" * 8)
    with pytest.raises(WeightsError, match="already"):
        weights.import_weights(b, overwrite=False)
    weights.import_weights(b)
    assert weights.sha256_file(cache / "custom" / "model.safetensors") == weights.sha256_file(b / "model.safetensors")
    assert sorted(p.name for p in cache.iterdir()) == ["custom"]
    weights.remove_model("custom")
    assert not (cache / "custom").exists()


def test_verify_reports_missing_files(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        weights.verify(d)
    (d / "config.json").write_text("{}", encoding="utf-8")
    with pytest.raises(WeightsError, match="model.safetensors"):
        weights.verify(d)


def test_weights_module_needs_only_the_standard_library():
    """Slicer imports it before torch is installed."""
    import ast

    tree = ast.parse(Path(weights.__file__).read_text(encoding="utf-8"))
    mods = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not mods & {"torch", "numpy", "monai", "slicer", "qt", "vtk", "pickle"}, mods
