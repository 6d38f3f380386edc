"""``meddiff-fm export``: one model copied (optionally fp16), several runs of one network averaged."""

from __future__ import annotations

import json

import torch

from MedDiffFMLib import cli
from MedDiffFMLib.checkpoint import load_base, save_model


def _saved(tmp_path, make_tiny_model, name, seed, steps, **overrides):
    model = make_tiny_model(seed, **overrides)
    return save_model(tmp_path / name, model.cfg, model.state_dict(), extra={"steps": steps}), model.state_dict()


def test_one_model_is_copied_as_fp16(tmp_path, make_tiny_model, capsys):
    src, weights = _saved(tmp_path, make_tiny_model, "run", seed=1, steps=10)
    assert cli.main(["export", str(src), "--fp16", "--to", str(tmp_path / "shipped")]) == 0
    assert "sha256" in capsys.readouterr().out
    loaded = load_base(tmp_path / "shipped").state_dict()
    for key, value in weights.items():
        torch.testing.assert_close(loaded[key], value.half().float(), rtol=0, atol=0)
    assert json.loads((tmp_path / "shipped" / "config.json").read_text())["meta"] == {"steps": 10}


def test_several_runs_are_averaged_weight_by_weight(tmp_path, make_tiny_model):
    a, weights_a = _saved(tmp_path, make_tiny_model, "run_a", seed=1, steps=10)
    b, weights_b = _saved(tmp_path, make_tiny_model, "run_b", seed=2, steps=12)
    assert cli.main(["export", str(a), str(b), "--to", str(tmp_path / "soup")]) == 0
    soup = load_base(tmp_path / "soup").state_dict()
    changed = 0
    for key, value in weights_a.items():
        if value.is_floating_point():
            torch.testing.assert_close(soup[key], (value + weights_b[key]) / 2)
            changed += not torch.equal(value, weights_b[key])
    assert changed > 10  # the two runs really differ, so the mean is neither of them
    meta = json.loads((tmp_path / "soup" / "config.json").read_text())["meta"]
    assert meta == {"averaged": [{"steps": 10}, {"steps": 12}]}


def test_runs_of_different_networks_are_refused_before_any_file_is_written(tmp_path, make_tiny_model, capsys):
    a, _ = _saved(tmp_path, make_tiny_model, "run_a", seed=1, steps=10)
    b, _ = _saved(tmp_path, make_tiny_model, "run_b", seed=2, steps=10, coord_frequencies=3)
    assert cli.main(["export", str(a), str(b), "--to", str(tmp_path / "soup")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not the same network" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "soup").exists()


def test_the_destination_may_not_be_a_source(tmp_path, make_tiny_model, capsys):
    a, _ = _saved(tmp_path, make_tiny_model, "run_a", seed=1, steps=10)
    b, _ = _saved(tmp_path, make_tiny_model, "run_b", seed=2, steps=10)
    before = (b / "model.safetensors").read_bytes()
    assert cli.main(["export", str(a), str(b), "--to", str(b)]) == 2
    assert "is a model being exported" in capsys.readouterr().err
    assert (b / "model.safetensors").read_bytes() == before
