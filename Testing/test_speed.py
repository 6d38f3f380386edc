"""The speed benchmark's CI-safe form: every table filled, numbers consistent. No timing asserts."""

from __future__ import annotations

import json

import pytest

from MedDiffFMLib import speed
from MedDiffFMLib.networks import preset

pytestmark = pytest.mark.usefixtures("single_thread")


def test_quick_run_fills_every_table_consistently(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert speed.main(["--quick", "--device", "cpu", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Sampling steps" in text and "FLOP floor" in text and "Resampling and writing" in text
    report = json.loads(out.read_text(encoding="utf-8"))
    steps = report["steps"]
    assert [tuple(r["shape"]) for r in steps] == [(16, 16, 16), (20, 40, 36)]
    single, tiled = steps
    assert single["windows"] == 1 and tiled["windows"] > 1
    for r in steps:
        assert r["step_s"] > 0 and r["bare_network_s"] > 0
        assert 0 < r["network_s"] <= r["step_s"]  # measured inside the step's own network calls
        assert r["machinery_s"] == pytest.approx(r["step_s"] - r["network_s"], abs=1e-3)
        assert r["peak_device_mib"] is None  # CPU run
        assert r["peak_host_mib"] is None or r["peak_host_mib"] >= 0
    # FLOPs scale with the windows of a step
    per_window = single["tflop_per_step"]
    assert tiled["tflop_per_step"] == pytest.approx(per_window * tiled["windows"], rel=1e-6)
    (floor,) = report["floors"]
    assert floor["measured_50_steps_s"] is None and "not this machine" in floor["gpu"]
    assert floor["floor_50_steps_s"] == pytest.approx(50 * floor["tflop_per_step"] / floor["peak_tflops"])
    resample_row, write_row = report["io"]
    assert resample_row["before_s"] > 0 and resample_row["after_s"] > 0
    assert "read back exactly: True" in write_row["detail"]
    assert any("not measured here" in n for n in report["notes"])
    try:
        import onnx, onnxruntime  # noqa: F401
    except ImportError:
        assert any("onnx backend: not measured" in n for n in report["notes"])
    else:
        (backend,) = report["backends"]
        assert backend["torch_s"] > 0 and backend["onnx_s"] > 0 and backend["max_abs_diff"] < 1e-4


def test_rows_over_the_window_limit_keep_layout_and_network_time_only():
    from MedDiffFMLib.speed import _random_predictor
    import torch

    predictor = _random_predictor("tiny", torch.device("cpu"))
    row = speed.measure_step("tiny", predictor, (20, 40, 36), (1.0, 1.0, 1.0), torch.device("cpu"), steps=1,
                             batch_size=4, precision="fp32", max_windows=2)
    assert row.windows > 2 and row.step_s is None and row.machinery_s is None and row.bare_network_s > 0
    assert row.tflop_per_step > 0


def test_flop_count_of_the_paper_network_matches_its_size():
    # the base preset (the paper's network) on one 128^3 window: about 3.0 TFLOP
    flops = speed.count_flops(preset("base"), (128, 128, 128))
    assert 2.5e12 < flops < 3.5e12
    half = speed.count_flops(preset("base"), (64, 128, 128))
    assert half == pytest.approx(flops / 2, rel=0.05)  # convolutions dominate: linear in voxels
