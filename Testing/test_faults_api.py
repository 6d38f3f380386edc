"""The fault suite through the Python API and the library's own guarantees: ``run_task`` refuses
wrong types with ``ValueError`` and never leaves the caller's arrays read-only; model files are
checked key by key and byte by byte; writes are all or none, leave no temporary file and
respect the umask; messages never quote temporary paths."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from MedDiffFMLib import io, modelformat, preflight, weights
from MedDiffFMLib.checkpoint import CheckpointError, load_base, load_controlnet, read_config
from MedDiffFMLib.tasks import TaskRequest, run_task
from MedDiffFMLib.volume import Volume


@pytest.fixture
def image(task_phantom) -> Volume:
    return Volume(task_phantom.hu.copy(), task_phantom.ijk_to_ras.copy())


# ------------------------------------------------------------------------------- run_task types
@pytest.mark.parametrize("make, words", [
    (lambda im: None, "TaskRequest"),
    (lambda im: TaskRequest(image=im.array), "Volume"),
    (lambda im: TaskRequest(image=im, params=[("steps", 1)]), "params"),
    (lambda im: TaskRequest(image=im, region=5), "region"),
    (lambda im: TaskRequest(image=im, anatomy_names=["liver"]), "anatomy_names"),
    (lambda im: TaskRequest(image=Volume(im.array.astype(np.complex64), im.ijk_to_ras)), "complex"),
    (lambda im: TaskRequest(image=Volume(im.array.astype(str), im.ijk_to_ras)), "numbers"),
    (lambda im: TaskRequest(image=Volume(im.array, np.diag([0.01, 0.01, 0.01, 1.0]))), "implausible voxel size"),
])
def test_run_task_refuses_wrong_types_with_value_error(image, tiny_model_dir, make, words):
    with pytest.raises(ValueError, match=words):
        run_task("denoise", make(image), tiny_model_dir, device="cpu")
    assert image.array.flags.writeable


def test_a_bad_mask_never_leaves_the_image_read_only(image, tiny_model_dir, tiny_controlnet_dirs):
    for mask in (np.ones(image.shape, bool), Volume(np.ones(image.shape, bool), np.zeros((4, 4))), "mask.nii.gz"):
        request = TaskRequest(image=image, mask=mask, params={"steps": 1})
        with pytest.raises(ValueError, match="mask"):
            run_task("lesion", request, tiny_model_dir, controlnet=tiny_controlnet_dirs["lesion"], device="cpu")
        assert image.array.flags.writeable


def test_inputs_stay_locked_through_every_out_of_memory_retry(image, tiny_model_dir, monkeypatch):
    """The guard is released once, after the last retry."""
    import importlib

    denoise = importlib.import_module("MedDiffFMLib.tasks.denoise")
    real = denoise.run
    seen = []

    def flaky(*args, **kwargs):
        seen.append(image.array.flags.writeable)
        if len(seen) < 3:
            raise torch.cuda.OutOfMemoryError("simulated")
        return real(*args, **kwargs)

    monkeypatch.setattr(denoise, "run", flaky)
    result = run_task("denoise", TaskRequest(image=image, region="abdomen", params={"steps": 1, "batch_size": 4}),
                      tiny_model_dir, device="cpu")
    assert seen == [False, False, False]  # read-only in every attempt
    assert image.array.flags.writeable  # and the caller's again afterwards
    assert np.isfinite(result.volumes["denoised"].array).all()


# ------------------------------------------------------------------------------- model files
@pytest.fixture
def model_copy(tmp_path, tiny_model_dir) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _edit(directory: Path, edit) -> Path:
    path = directory / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    edit(cfg)
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def test_schema_lists_exactly_the_network_config_fields():
    from MedDiffFMLib.networks import ControlNetConfig, ModelConfig

    assert set(modelformat.BASE_SCHEMA) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(modelformat.CONTROLNET_SCHEMA) == {f.name for f in dataclasses.fields(ControlNetConfig)}


@pytest.mark.parametrize("key", [k for k, (required, _) in modelformat.BASE_SCHEMA.items() if required])
def test_every_required_base_key_is_checked(model_copy, key):
    path = _edit(model_copy, lambda c: c.pop(key))
    for check in (lambda: read_config(model_copy), lambda: weights.verify(model_copy)):
        with pytest.raises(ValueError) as e:
            check()
        assert str(path) in str(e.value) and repr(key) in str(e.value) and "missing" in str(e.value)


@pytest.mark.parametrize("key, value, words", [
    ("window", "big", "whole number"), ("spacing_range_mm", [-4, 4], "min <= max"),
    ("spacing_range_mm", [4.0], "min <= max"), ("spacing_range_mm", [8.0, 1.0], "min <= max"),
    ("channels", [8, "x"], "list"), ("attention_levels", [0, 1], "true/false"), ("schedule", "", "text"),
    ("format", "other/2", "unsupported"), ("kind", "lora", "'kind'"), ("dropout", 0.1, "unknown key"),
    ("meta", [], "JSON object"), ("channels", [8, 16, 32], "same length"),
])
def test_wrong_types_name_the_file_and_the_key(model_copy, key, value, words):
    path = _edit(model_copy, lambda c: c.__setitem__(key, value))
    with pytest.raises(CheckpointError, match=words) as e:
        load_base(model_copy)
    assert str(path) in str(e.value)
    assert "%" not in str(e.value)  # no broken string formatting


@pytest.mark.parametrize("key", ["task", "control_channels", "base", "base_sha256"])
def test_controlnet_keys_are_required(tmp_path, tiny_model_dir, tiny_controlnet_dirs, key):
    cn = Path(shutil.copytree(tiny_controlnet_dirs["lesion"], tmp_path / "cn"))
    path = _edit(cn, lambda c: c.pop(key))
    with pytest.raises(CheckpointError, match=repr(key)) as e:
        load_controlnet(cn, tiny_model_dir)
    assert str(path) in str(e.value)
    with pytest.raises(weights.WeightsError, match=repr(key)):
        weights.verify(cn)


def test_controlnet_base_keys_are_checked_too(tmp_path, tiny_controlnet_dirs):
    cn = Path(shutil.copytree(tiny_controlnet_dirs["superres"], tmp_path / "cn"))
    _edit(cn, lambda c: c["base"].pop("spacing_range_mm"))
    with pytest.raises(weights.WeightsError, match="'base.spacing_range_mm' is missing"):
        weights.verify(cn)


@pytest.mark.parametrize("cut", [1, 100, 4000])
def test_verify_refuses_a_truncated_or_padded_safetensors_file(model_copy, cut):
    f = model_copy / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[:-cut])
    with pytest.raises(weights.WeightsError, match="truncated"):
        weights.verify(model_copy)
    f.write_bytes(raw + b"\0" * 8)
    with pytest.raises(weights.WeightsError, match="longer than its tensors"):
        weights.verify(model_copy)
    f.write_bytes(raw)
    assert weights.verify(model_copy) == weights.sha256_file(f)


def test_non_finite_weights_are_refused_when_loading(model_copy):
    from safetensors.torch import load_file, save_file

    f = model_copy / "model.safetensors"
    tensors = load_file(str(f))
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 4)
    tensors[name].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 1.0])
    save_file(tensors, str(f), metadata={"format": modelformat.FORMAT, "kind": "base"})
    weights.verify(model_copy)  # the bytes are well formed ...
    with pytest.raises(CheckpointError, match="NaN or infinite weights") as e:
        load_base(model_copy)  # ... but not usable
    assert name in str(e.value)


def test_import_messages_name_the_archive_not_the_temporary_folder(tmp_path, tiny_model_dir, monkeypatch):
    import zipfile

    monkeypatch.setenv(weights.ENV_MODELS_DIR, str(tmp_path / "cache"))
    src = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    _edit(src, lambda c: c.pop("window"))
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in src.iterdir():
            zf.write(f, f"m/{f.name}")
    for source in (archive, src):
        with pytest.raises(weights.WeightsError) as e:
            weights.import_weights(source)
        text = str(e.value)
        assert "'window' is missing" in text and str(source) in text
        assert ".import-" not in text
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # nothing left in the cache


# ------------------------------------------------------------------------------- writing
def _vol(value=1.0) -> Volume:
    return Volume(np.full((3, 4, 5), value, np.float32), np.diag([2.0, 1.0, 1.5, 1.0]))


def test_written_files_respect_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        io.write_volume(tmp_path / "a.nii.gz", _vol(), label_names={1: "x"})
        io.write_volume(tmp_path / "b.nrrd", _vol())
    finally:
        os.umask(old)
    for name in ("a.nii.gz", "a.labels.json", "b.nrrd"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_nothing(tmp_path, monkeypatch, exc):
    (tmp_path / "old.nii.gz").write_bytes(b"previous")
    from MedDiffFMLib.io import write as io_write

    real = io_write._write_nifti
    calls = []

    def failing(tmp, *args):
        calls.append(tmp)
        if len(calls) == 2:
            real(tmp, *args)  # a partial file exists when it fails
            raise exc
        return real(tmp, *args)

    monkeypatch.setattr(io_write, "_write_nifti", failing)
    staged = io.StagedWrites()
    with pytest.raises(type(exc)) as e:
        with staged:
            staged.add(tmp_path / "new.nii.gz", _vol())
            staged.add(tmp_path / "old.nii.gz", _vol(2.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.nii.gz"]  # no output, no temporary file
    assert (tmp_path / "old.nii.gz").read_bytes() == b"previous"
    if isinstance(exc, OSError):
        assert "old.nii.gz" in str(e.value) and ".tmp" not in str(e.value)


def test_a_folder_in_the_way_fails_before_anything_is_written(tmp_path):
    (tmp_path / "x_side.nii.gz").mkdir()
    with pytest.raises(IsADirectoryError, match="folder"):
        with io.StagedWrites() as staged:
            staged.add(tmp_path / "x.nii.gz", _vol())
            staged.add(tmp_path / "x_side.nii.gz", _vol())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_side.nii.gz"]


def test_read_mask_takes_every_non_zero_voxel(tmp_path):
    a = np.zeros((3, 4, 5), np.float32)
    a[1, 2, 3], a[2, 0, 0] = 0.5, -1.0
    io.write_volume(tmp_path / "m.nii", Volume(a, np.eye(4)))
    m = io.read_mask(tmp_path / "m.nii")
    assert m.array.dtype == bool and int(m.array.sum()) == 2 and m.array[1, 2, 3]


# ------------------------------------------------------------------------------- preflight
def test_a_whole_volume_mask_is_warned_about(image):
    req = TaskRequest(image=image, mask=Volume(np.ones(image.shape, np.uint8), image.ijk_to_ras))
    preflight.check_request("lesion", req)
    (warning,) = preflight.request_warnings("lesion", req)
    assert "100%" in warning and "air and bone" in warning
    small = np.zeros(image.shape, np.uint8)
    small[2:4, 4:8, 4:8] = 1
    assert preflight.request_warnings("lesion", TaskRequest(image=image, mask=Volume(small, image.ijk_to_ras))) == []


def test_memory_estimate_refuses_with_advice():
    voxels = preflight.grid_voxels("denoise", (40, 60, 60), (20.0, 20.0, 20.0), 1.0, {})
    assert voxels == 800 * 1200 * 1200
    with pytest.raises(ValueError, match="million voxels.*crop the image.*--max-memory-gb"):
        preflight.check_memory(voxels, "cpu", limit_gb=16)
    assert preflight.check_memory(1000, "cpu") == 1000 * preflight.BYTES_PER_VOXEL
    # super-resolution: the output grid (3x the slices) is larger than the model's 2 mm grid
    assert preflight.grid_voxels("superres", (10, 20, 20), (3.0, 1.0, 1.0), 2.0, {"factor": 3}) == 30 * 20 * 20
