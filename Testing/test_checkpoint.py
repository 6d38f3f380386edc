"""Model directories: round trip, clear refusals, no pickle, ControlNet bound to its base."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from MedDiffFMLib.checkpoint import (
    CheckpointError,
    load_base,
    load_controlnet,
    load_training_state,
    read_config,
    save_model,
    save_training_state,
    sha256_file,
)
from MedDiffFMLib.networks import ControlNetConfig, TaskControlNet

PACKAGE = Path(__file__).resolve().parent.parent / "MedDiffFMLib"


@pytest.fixture
def model_dir(tmp_path, tiny_model_dir):
    """A writable copy of the tiny model directory."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.update(changes)
    path.write_text(json.dumps(cfg), encoding="utf-8")


# ------------------------------------------------------------------------------- round trip
def test_round_trip(tmp_path, make_tiny_model):
    model = make_tiny_model(seed=5, coord_frequencies=3)
    d = save_model(tmp_path / "m", model.cfg, model.state_dict(), extra={"steps": 12})
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    back = load_base(d)
    assert back.cfg == model.cfg
    assert not back.training
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    cfg = read_config(d)
    assert cfg["kind"] == "base" and cfg["meta"] == {"steps": 12} and cfg["format"] == "meddiff-fm/1"
    # the same inputs give the same outputs
    x = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    args = (x, torch.tensor([10]), torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, model.cfg.anatomy_channels, 4, 4, 4),
            torch.tensor([1]), torch.tensor([[2.5, 0.8, 0.8]]))
    with torch.no_grad():
        assert torch.equal(model.eval()(*args), back(*args))


def test_half_precision_save_loads_into_float32(tmp_path, make_tiny_model):
    model = make_tiny_model()
    d = save_model(tmp_path / "m", model.cfg, model.state_dict(), dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in load_file(str(d / "model.safetensors")).values()
               if v.is_floating_point())
    back = load_base(d).state_dict()
    for k, v in model.state_dict().items():
        assert back[k].dtype == v.dtype
        torch.testing.assert_close(back[k], v.half().to(v.dtype))


def test_the_same_weights_save_to_the_same_bytes(tmp_path, make_tiny_model):
    """A re-export of unchanged weights keeps its sha256 (the registry and every ControlNet's
    base_sha256 depend on it); with two metadata entries safetensors varied their order."""
    model = make_tiny_model(seed=3)
    shas = {sha256_file(save_model(tmp_path / f"m{i}", model.cfg, model.state_dict(), dtype=torch.float16)
                        / "model.safetensors") for i in range(12)}
    assert len(shas) == 1


def test_save_overwrites_atomically(tmp_path, make_tiny_model):
    a, b = make_tiny_model(seed=1), make_tiny_model(seed=2)
    d = save_model(tmp_path / "m", a.cfg, a.state_dict())
    save_model(d, b.cfg, b.state_dict())
    back = load_base(d)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in back.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old folders left


def test_training_state_round_trip(tmp_path):
    tensors = {"raw.w": torch.arange(6.0).view(2, 3), "rng.0": torch.Generator().manual_seed(4).get_state()}
    save_training_state(tmp_path / "ts", tensors, {"step": 7, "world": 1})
    t, s = load_training_state(tmp_path / "ts")
    assert s == {"step": 7, "world": 1}
    assert all(torch.equal(t[k], v) for k, v in tensors.items())
    with pytest.raises(CheckpointError, match="cannot resume"):
        load_training_state(tmp_path / "missing")


# ------------------------------------------------------------------------------- refusals
def test_changed_channels_are_refused(model_dir):
    _edit_config(model_dir, channels=[16, 32])
    with pytest.raises(CheckpointError) as e:
        load_base(model_dir)
    msg = str(e.value)
    assert "disagree" in msg and "shape" in msg and "conv_in" in msg
    assert str(model_dir) in msg


def test_a_missing_tensor_is_named(model_dir):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    victim = "unet.out.2.conv.weight"
    del tensors[victim]
    save_file(tensors, str(path), metadata={"format": "meddiff-fm/1", "kind": "base"})
    with pytest.raises(CheckpointError, match="missing") as e:
        load_base(model_dir)
    assert victim in str(e.value)


def test_an_unexpected_tensor_is_named(model_dir):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["unet.extra_head.weight"] = torch.zeros(3)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="unexpected") as e:
        load_base(model_dir)
    assert "unet.extra_head.weight" in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_a_corrupt_weights_file_is_refused(model_dir, damage):
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "header":
        data[8:40] = b"\xff" * 32
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_base(model_dir)
    assert "model.safetensors" in str(e.value)


def test_missing_files_are_refused(model_dir, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_base(tmp_path / "nowhere")
    (model_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_base(model_dir)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        d = tmp_path / "only_config"
        d.mkdir()
        (d / "config.json").write_text("{}", encoding="utf-8")
        load_base(d)


def test_bad_config_files_are_refused(model_dir):
    (model_dir / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_base(model_dir)
    cfg = {"kind": "base", "format": "something-else/9"}
    (model_dir / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(CheckpointError, match="unsupported format"):
        load_base(model_dir)


def test_unknown_config_keys_are_refused(model_dir):
    _edit_config(model_dir, dropout=0.1)
    with pytest.raises(CheckpointError, match="dropout"):
        load_base(model_dir)


def test_invalid_config_values_are_refused(model_dir):
    _edit_config(model_dir, window=15)
    with pytest.raises(CheckpointError, match="window 15"):
        load_base(model_dir)


def test_wrong_kind_is_refused(tmp_path, tiny_model_dir):
    base = load_base(tiny_model_dir)
    cn_cfg = ControlNetConfig("superres", 1, base.cfg, base_sha256=sha256_file(tiny_model_dir / "model.safetensors"))
    cn = TaskControlNet(cn_cfg)
    cn.init_from_base(base)
    cn_dir = save_model(tmp_path / "cn", cn_cfg, cn.state_dict())
    with pytest.raises(CheckpointError, match="not a foundation"):
        load_base(cn_dir)
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(tiny_model_dir, tiny_model_dir)


# ------------------------------------------------------------------------------- ControlNet and its base
def test_controlnet_is_bound_to_its_base(tmp_path, make_tiny_model):
    base_a = make_tiny_model(seed=1)
    base_b = make_tiny_model(seed=2)
    dir_a = save_model(tmp_path / "base_a", base_a.cfg, base_a.state_dict())
    dir_b = save_model(tmp_path / "base_b", base_b.cfg, base_b.state_dict())
    cn_cfg = ControlNetConfig("lesion", 2, base_a.cfg, base_sha256=sha256_file(dir_a / "model.safetensors"),
                              params={"margin_mm": 5.0})
    cn = TaskControlNet(cn_cfg)
    cn.init_from_base(base_a)
    with torch.no_grad():
        for p in cn.controlnet.controlnet_mid_block.parameters():
            p.add_(0.01)
    cn_dir = save_model(tmp_path / "cn", cn_cfg, cn.state_dict())

    predictor = load_controlnet(cn_dir, dir_a)
    assert predictor.controlnet.cfg.params == {"margin_mm": 5.0}
    for k, v in cn.state_dict().items():
        assert torch.equal(predictor.controlnet.state_dict()[k], v), k
    for k, v in base_a.state_dict().items():
        assert torch.equal(predictor.base.state_dict()[k], v), k

    with pytest.raises(CheckpointError, match="sha256") as e:
        load_controlnet(cn_dir, dir_b)
    msg = str(e.value)
    assert sha256_file(dir_a / "model.safetensors")[:12] in msg
    assert sha256_file(dir_b / "model.safetensors")[:12] in msg


def test_controlnet_for_another_base_configuration_is_refused(tmp_path, make_tiny_model):
    base = make_tiny_model()
    other = make_tiny_model(coord_frequencies=3)
    base_dir = save_model(tmp_path / "base", base.cfg, base.state_dict())
    # the right base's hash, but built on another base configuration: the config check must catch it
    cn_cfg = ControlNetConfig("superres", 1, other.cfg, base_sha256=sha256_file(base_dir / "model.safetensors"))
    cn = TaskControlNet(cn_cfg)
    cn_dir = save_model(tmp_path / "cn", cn_cfg, cn.state_dict())
    with pytest.raises(CheckpointError, match="different base configuration"):
        load_controlnet(cn_dir, base_dir)


# ------------------------------------------------------------------------------- no pickle
def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    return files


_PICKLE_PATTERNS = [
    (r"^\s*(import|from)\s+(c?pickle|dill|joblib|cloudpickle)\b", "imports a pickle module"),
    (r"allow_pickle\s*=\s*True", "allow_pickle=True"),
    (r"torch\.(jit\.)?save\s*\(", "torch.save writes pickles"),
]


def _pickle_offences(text: str) -> list[str]:
    found = []
    for m in re.finditer(r"torch\.load\s*\(", text):
        # the whole call, up to its closing parenthesis
        depth, i = 0, m.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth == 0:
                break
            i += 1
        if not re.search(r"weights_only\s*=\s*True", text[m.start(): i + 1]):
            found.append("torch.load without weights_only=True")
    for pattern, what in _PICKLE_PATTERNS:
        if re.search(pattern, text, flags=re.MULTILINE):
            found.append(what)
    return found


def test_no_pickle_anywhere_in_the_library():
    offenders = [f"{path.relative_to(PACKAGE)}: {o}" for path in _sources()
                 for o in _pickle_offences(path.read_text(encoding="utf-8"))]
    assert not offenders, offenders


def test_the_pickle_scan_sees_offences():
    assert _pickle_offences("state = torch.load(path, map_location=dict(a=1))\n") == [
        "torch.load without weights_only=True"]
    assert _pickle_offences("state = torch.load(\n    path, map_location='cpu', weights_only=True)\n") == []
    assert _pickle_offences("import os\n    import pickle\n") == ["imports a pickle module"]
    assert _pickle_offences("x = np.load(p, allow_pickle=True)\ntorch.save(m, p)\n") == [
        "allow_pickle=True", "torch.save writes pickles"]
