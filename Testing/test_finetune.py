"""ControlNet fine-tuning: the zero-convolution start, training, saving and reloading on the
right base only; the super-resolution and lesion training pairs; the ``finetune`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from MedDiffFMLib import cli, io
from MedDiffFMLib.checkpoint import CheckpointError, load_base, load_controlnet, save_model, sha256_file
from MedDiffFMLib.conditions import CONTROL_CHANNELS, lesion_condition
from MedDiffFMLib.finetune import THIN_SLICE_MM, lesion_phantom_cases, superres_cases
from MedDiffFMLib.networks import ControlNetConfig, NoisePredictor
from MedDiffFMLib.phantoms import make_phantom
from MedDiffFMLib.tasks import TaskRequest, run_task
from MedDiffFMLib.training import Trainer, TrainOptions, draw_batch, phantom_cases

pytestmark = pytest.mark.usefixtures("single_thread")

FACTORS = (2, 3)


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model_dir):
    """A superres ControlNet on the tiny base: the trainer before and after 3 steps, its output folder,
    and a batch with the base's and base + ControlNet's predictions before the first step."""
    base = load_base(tiny_model_dir, "cpu")
    cfg = base.cfg
    cases = superres_cases(phantom_cases(1, cfg, seed=3, fov_mm=(20.0, 24.0, 24.0), regions=("abdomen",),
                                         family="miniature", thin_slice_mm=THIN_SLICE_MM), FACTORS)
    cn_cfg = ControlNetConfig(task="superres", control_channels=CONTROL_CHANNELS["superres"], base=cfg,
                              base_sha256=sha256_file(tiny_model_dir / "model.safetensors"),
                              params={"factors": list(FACTORS)})
    out = tmp_path_factory.mktemp("finetune") / "run"
    opts = TrainOptions(steps=3, batch_size=1, progress=False, checkpoint_every=1000, seed=0)
    trainer = Trainer(cases, out, opts, cfg, device="cpu", base=base, controlnet_cfg=cn_cfg)

    # before any step
    batch = draw_batch(cases, 2, cfg.window, torch.Generator().manual_seed(5), opts)
    x_t, t, _ = trainer.loss.noisy(batch["x0"], torch.Generator().manual_seed(6))
    args = (x_t, t, batch["coords"], batch["anatomy"], batch["region"], batch["spacing"])
    with torch.no_grad():
        eps_base = base(*args)
        down, mid = trainer.model(base, *args, batch["control"])
        eps_cn = base(*args, down_residuals=down, mid_residual=mid)
        eps_pred = NoisePredictor(base, trainer.model)(*args, batch["control"])
    before = dict(cn=_state(trainer.model), base=_state(base))
    losses = trainer.train()
    return dict(trainer=trainer, base=base, out=out, losses=losses, before=before, eps_base=eps_base,
                eps_cn=eps_cn, eps_pred=eps_pred, residuals=(down, mid))


def test_finetuning_starts_exactly_from_the_base(finetuned):
    down, mid = finetuned["residuals"]
    assert all(not r.any() for r in down) and not mid.any()
    assert torch.equal(finetuned["eps_cn"], finetuned["eps_base"])
    assert torch.equal(finetuned["eps_pred"], finetuned["eps_base"])
    assert finetuned["eps_base"].abs().sum() > 0  # a real prediction, not zeros on both sides


def test_training_changes_the_controlnet_only(finetuned):
    tr = finetuned["trainer"]
    assert tr.step == 3 and len(finetuned["losses"]) == 3
    assert all(np.isfinite(finetuned["losses"]))
    after = tr.model.state_dict()
    changed = [k for k, v in finetuned["before"]["cn"].items() if not torch.equal(v, after[k])]
    assert changed
    assert any(k.startswith("controlnet.controlnet_") for k in changed)  # the zero convolutions moved
    for k, v in finetuned["before"]["base"].items():
        assert torch.equal(v, finetuned["base"].state_dict()[k]), k
    assert not any(p.requires_grad for p in finetuned["base"].parameters())


def test_saved_controlnet_directory(finetuned, tiny_model_dir):
    model_dir = finetuned["out"] / "model"
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    assert cfg["kind"] == "controlnet" and cfg["task"] == "superres" and cfg["control_channels"] == 3
    assert cfg["base_sha256"] == sha256_file(tiny_model_dir / "model.safetensors")
    assert cfg["params"] == {"factors": [2, 3]}
    assert cfg["meta"]["steps"] == 3
    assert (finetuned["out"] / "training_state" / "state.safetensors").is_file()
    assert list(model_dir.glob("*.pt")) == [] and list(model_dir.glob("*.pkl")) == []


def test_reload_on_its_base(finetuned, tiny_model_dir):
    model_dir = finetuned["out"] / "model"
    pred = load_controlnet(model_dir, tiny_model_dir, "cpu")
    saved = load_file(str(model_dir / "model.safetensors"))
    own = pred.controlnet.state_dict()
    assert set(saved) == set(own)
    assert all(torch.equal(saved[k].to(own[k].dtype), own[k]) for k in saved)
    assert pred.controlnet.cfg.params == {"factors": [2, 3]}
    # the saved weights are the EMA, which is not the raw last step
    raw = finetuned["trainer"].model.state_dict()
    assert any(not torch.equal(raw[k], own[k]) for k in own if own[k].is_floating_point())


def test_refuses_a_different_base(finetuned, tmp_path, make_tiny_model, task_phantom):
    other = make_tiny_model(seed=99)
    other_dir = save_model(tmp_path / "other_base", other.cfg, other.state_dict())
    model_dir = finetuned["out"] / "model"
    with pytest.raises(CheckpointError, match="sha256"):
        load_controlnet(model_dir, other_dir, "cpu")
    req = TaskRequest(image=task_phantom.volume(), region="abdomen", params={"steps": 1})
    with pytest.raises(ValueError, match="sha256"):
        run_task("superres", req, other_dir, controlnet=model_dir, device="cpu")


# ----------------------------------------------------------------------------- training pairs
def test_lesion_phantom_cases(tiny_model_dir):
    cfg = load_base(tiny_model_dir).cfg
    (case,) = lesion_phantom_cases(1, cfg, seed=4, lesions=2, regions=("abdomen",), fov_mm=(24.0, 48.0, 48.0),
            family="miniature",
                                   p_healthy=0.0)
    assert case.control.shape == (2, *case.image.shape)
    mask = case.control[0] > 0
    assert mask.any() and torch.equal(case.control, lesion_condition(case.image, mask))
    assert torch.equal(case.focus, torch.nonzero(mask))  # crops are steered to the lesions


# ----------------------------------------------------------------------------- CLI
def test_cli_finetune_then_superres(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "cn"
    rc = cli.main(["finetune", "--task", "superres", "--base", str(tiny_model_dir), "--phantoms", "2",
                   "--steps", "2", "--phantom-family", "miniature", "--phantom-fov", "24", "32", "32", "--factors", "2",
                   "--batch-size", "1",
                   "--out", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert "finetune (superres): 2 steps" in capsys.readouterr().out
    cfg = json.loads((out / "model" / "config.json").read_text(encoding="utf-8"))
    # the config records how the condition was built, so that inference builds it the same way
    assert cfg["kind"] == "controlnet" and cfg["params"] == {"factors": [2], "interpolation": "parabolic",
                                                                "thin_slice_mm": THIN_SLICE_MM}
    assert cfg["base_sha256"] == sha256_file(tiny_model_dir / "model.safetensors")

    ph = make_phantom("abdomen", shape_kji=(5, 12, 12), spacing_kji=(2.0, 1.0, 1.0), seed=8, noise_hu=10.0)
    ct = tmp_path / "ct.nii.gz"
    io.write_volume(ct, ph.volume())
    sr = tmp_path / "sr.nii.gz"
    rc = cli.main(["superres", str(ct), "-o", str(sr), "--model", str(tiny_model_dir), "--controlnet",
                   str(out / "model"), "--device", "cpu", "--quiet", "--region", "abdomen", "--steps", "1",
                   "--factor", "2"])
    assert rc == 0
    vol = io.read_volume(sr)
    assert vol.shape == (10, 12, 12)
    np.testing.assert_allclose(vol.spacing_kji, (1.0, 1.0, 1.0), atol=1e-5)

    # a later run warm-started from this ControlNet starts at its weights (a vanishing learning rate
    # and no EMA keep them), unlike a fresh run, whose zero convolutions start at zero
    common = ["finetune", "--task", "superres", "--base", str(tiny_model_dir), "--phantoms", "1", "--steps", "1",
              "--phantom-family", "miniature", "--phantom-fov", "24", "32", "32", "--factors", "2", "--batch-size", "1",
              "--lr", "1e-12", "--ema-decay", "0", "--device", "cpu", "--no-progress"]
    assert cli.main(common + ["--out", str(tmp_path / "warm"), "--init-from", str(out / "model")]) == 0
    assert "initialised from" in capsys.readouterr().out
    assert cli.main(common + ["--out", str(tmp_path / "fresh")]) == 0
    before = load_file(str(out / "model" / "model.safetensors"))
    warm = load_file(str(tmp_path / "warm" / "model" / "model.safetensors"))
    fresh = load_file(str(tmp_path / "fresh" / "model" / "model.safetensors"))
    assert set(warm) == set(before)
    assert max(float((warm[k].float() - before[k].float()).abs().max()) for k in before) < 1e-6
    assert max(float((fresh[k].float() - before[k].float()).abs().max()) for k in before) > 1e-4
    assert cli.main(common + ["--out", str(tmp_path / "bad"), "--init-from", str(tmp_path)]) == 2


@pytest.mark.parametrize("thin_slice_mm", [1.5, 4.0])
def test_training_grids_keep_slices_under_the_thin_slice_limit(thin_slice_mm):
    from MedDiffFMLib.training.cases import random_training_grid

    rng = np.random.default_rng(0)
    slices = [random_training_grid(rng, thin_slice_mm=thin_slice_mm)[1][0] for _ in range(200)]
    assert max(slices) <= thin_slice_mm and min(slices) >= 0.5
    assert max(slices) > 0.8 * thin_slice_mm  # the whole range is drawn, not only thin slices
    anything = [random_training_grid(rng)[1][0] for _ in range(200)]
    assert max(anything) > 4.0
