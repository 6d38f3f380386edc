"""The ONNX Runtime backend: export, cache, the predictor's contract and task parity with torch.

Parity tolerance: the same task with the same seed on both backends agrees within
:data:`PARITY_HU` HU on every voxel (measured on these cases: below 0.01 HU; the network
outputs differ by ~1e-6, and a few sampling steps carry that into the image).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from MedDiffFMLib import onnx_backend  # noqa: E402
from MedDiffFMLib.checkpoint import load_base  # noqa: E402
from MedDiffFMLib.networks import NoisePredictor  # noqa: E402
from MedDiffFMLib.tasks import TaskRequest, run_task  # noqa: E402
from MedDiffFMLib.volume import Volume  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

PARITY_HU = 0.05
NETWORK_TOLERANCE = 1e-4


@pytest.fixture
def onnx_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(onnx_backend.ENV_CACHE_DIR, str(tmp_path / "onnx"))
    return tmp_path / "onnx"


def _window_inputs(cfg, shape, batch, control_channels=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(batch, 1, *shape, generator=gen), torch.randint(0, 1000, (batch,), generator=gen),
              torch.rand(batch, 3, *shape, generator=gen) * 2 - 1,
              (torch.rand(batch, cfg.anatomy_channels, *shape, generator=gen) > 0.8).float(),
              torch.randint(0, cfg.num_regions + 1, (batch,), generator=gen),
              torch.rand(batch, 3, generator=gen) + 0.5]
    control = torch.randn(batch, control_channels, *shape, generator=gen) if control_channels else None
    return inputs, control


def _args(inputs):
    """Positional arguments of NoisePredictor.forward (spacing where it takes it)."""
    x, t, coords, anat, region, spacing = inputs
    return (x, t, coords, anat, region) + ((spacing,) if "spacing" in onnx_backend.PREDICTOR_SIGNATURE.parameters
                                           else ())


def _torch_call(predictor, inputs, control=None, scale=1.0):
    with torch.no_grad():
        if control is None:
            return predictor(*_args(inputs))
        return predictor(*_args(inputs), control=control, control_scale=scale)


def test_export_is_cached_by_weights_and_matches_torch_for_any_batch_and_window(tiny_model_dir, onnx_cache):
    first = onnx_backend.export_onnx(tiny_model_dir)
    assert first.path.parent == onnx_cache and not first.cached
    assert first.max_abs_diff < NETWORK_TOLERANCE
    mtime = first.path.stat().st_mtime_ns
    again = onnx_backend.export_onnx(tiny_model_dir)
    assert again.cached and again.path == first.path and again.path.stat().st_mtime_ns == mtime
    assert not list(onnx_cache.glob(".*tmp*")), "temporary files left behind"

    torch_predictor = NoisePredictor(load_base(tiny_model_dir)).eval()
    onnx_predictor = onnx_backend.load_onnx_predictor(tiny_model_dir, None, "cpu")
    assert onnx_predictor.providers == ["CPUExecutionProvider"]
    assert onnx_predictor.cfg == torch_predictor.cfg
    # dynamic batch and window: a full window, and a smaller, non-cubic one (volume borders)
    for shape, batch in (((16, 16, 16), 3), ((8, 16, 12), 1)):
        inputs, _ = _window_inputs(torch_predictor.cfg, shape, batch)
        expected = _torch_call(torch_predictor, inputs)
        got = onnx_predictor(*_args(inputs))
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert float((got - expected).abs().max()) < NETWORK_TOLERANCE


def test_controlnet_graph_uses_its_condition_and_scale(tiny_model_dir, tiny_controlnet_dirs, onnx_cache):
    from MedDiffFMLib.checkpoint import load_controlnet

    cn_dir = tiny_controlnet_dirs["lesion"]
    report = onnx_backend.export_onnx(tiny_model_dir, cn_dir)
    assert "lesion" in report.path.name and report.max_abs_diff < NETWORK_TOLERANCE
    torch_predictor = load_controlnet(cn_dir, tiny_model_dir).eval()
    onnx_predictor = onnx_backend.load_onnx_predictor(tiny_model_dir, cn_dir, "cpu")
    assert onnx_predictor.controlnet.cfg.task == "lesion"
    inputs, control = _window_inputs(torch_predictor.cfg, (16, 16, 16), 2, control_channels=2)
    outs = []
    for scale in (1.0, 0.3):
        expected = _torch_call(torch_predictor, inputs, control, scale)
        got = onnx_predictor(*_args(inputs), control=control, control_scale=scale)
        assert float((got - expected).abs().max()) < NETWORK_TOLERANCE
        outs.append(got)
    assert float((outs[0] - outs[1]).abs().max()) > 1e-4, "control_scale had no effect"
    with pytest.raises(ValueError, match="control condition is required"):
        onnx_predictor(*_args(inputs))
    with pytest.raises(TypeError):  # not an argument of NoisePredictor.forward
        onnx_predictor(*_args(inputs), control=control, guidance=2.0)


def test_new_weights_get_a_new_graph(tiny_model_dir, make_tiny_model, tmp_path, onnx_cache):
    from MedDiffFMLib.checkpoint import save_model

    other = make_tiny_model(seed=7)
    other_dir = save_model(tmp_path / "other", other.cfg, other.state_dict())
    assert onnx_backend.graph_name(other_dir) != onnx_backend.graph_name(tiny_model_dir)


@pytest.mark.parametrize("task", ["denoise", "superres"])
def test_task_gives_the_same_output_on_both_backends(task, task_phantom, tiny_model_dir, tiny_controlnet_dirs,
                                                      onnx_cache):
    image = Volume(np.array(task_phantom.hu, dtype=np.float32), task_phantom.ijk_to_ras.copy())
    params = {"steps": 2, "seed": 3}
    if task == "denoise":
        params["method"] = "ddpm"
    controlnet = tiny_controlnet_dirs["superres"] if task == "superres" else None
    outputs = {}
    for backend in ("torch", "onnx"):
        request = TaskRequest(image=image, region="abdomen", params={**params, "backend": backend})
        result = run_task(task, request, tiny_model_dir, controlnet=controlnet, device="cpu")
        outputs[backend] = result
    (name, a), = outputs["torch"].volumes.items()
    b = outputs["onnx"].volumes[name]
    assert a.array.shape == b.array.shape
    np.testing.assert_array_equal(a.ijk_to_ras, b.ijk_to_ras)
    diff = np.abs(a.array.astype(np.float64) - b.array)
    print(f"{task}: max |torch - onnx| {diff.max():.3g} HU")
    assert diff.max() < PARITY_HU, f"max difference {diff.max():.4g} HU"
    if task == "denoise":  # the task did something
        assert np.abs(a.array - image.array).max() > 1.0


def test_cuda_request_without_a_cuda_provider_is_refused_before_work():
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here")
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        onnx_backend.providers_for("cuda")
    assert onnx_backend.providers_for("auto") == ["CPUExecutionProvider"]
    assert onnx_backend.sampler_device("cpu") == torch.device("cpu")


def test_export_command_writes_the_foundation_model_and_each_controlnet(tiny_model_dir, tiny_controlnet_dirs,
                                                                        tmp_path, onnx_cache, capsys):
    from MedDiffFMLib import cli

    out = tmp_path / "graphs"
    argv = ["export-onnx", "--model", str(tiny_model_dir), "--controlnet", *map(str, tiny_controlnet_dirs.values()),
            "--output-dir", str(out)]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("max |onnx - torch|" in line for line in lines)
    names = sorted(p.name for p in out.glob("*.onnx"))
    assert len(names) == 3 and sum("superres" in n for n in names) == 1 and sum("lesion" in n for n in names) == 1
    assert all((out / (n + ".json")).is_file() for n in names)
    assert not onnx_cache.exists()  # --output-dir, not the cache
    assert cli.main(argv) == 0 and capsys.readouterr().out.count("cached") == 3
