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
from MedDiffFMLib.finetune import (BLANK_VALUE, lesion_condition, lesion_phantom_cases, superres_cases,
                                   superres_condition, thick_slices, upsample_blocks)
from MedDiffFMLib.geometry import make_ijk_to_ras, regrid, voxel_to_ras
from MedDiffFMLib.networks import ControlNetConfig, NoisePredictor
from MedDiffFMLib.phantoms import make_phantom
from MedDiffFMLib.tasks import TaskRequest, run_task
from MedDiffFMLib.training import Trainer, TrainOptions, draw_batch, phantom_cases

pytestmark = pytest.mark.usefixtures("single_thread")

FACTOR = (2, 1, 1)


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_model_dir):
    """A superres ControlNet on the tiny base: the trainer before and after 3 steps, its output folder,
    and a batch with the base's and base + ControlNet's predictions before the first step."""
    base = load_base(tiny_model_dir, "cpu")
    cfg = base.cfg
    cases = superres_cases(phantom_cases(1, cfg, seed=3, fov_mm=(20.0, 24.0, 24.0), regions=("abdomen",)), FACTOR)
    cn_cfg = ControlNetConfig(task="superres", control_channels=1, base=cfg,
                              base_sha256=sha256_file(tiny_model_dir / "model.safetensors"),
                              params={"factor": list(FACTOR)})
    out = tmp_path_factory.mktemp("finetune") / "run"
    opts = TrainOptions(steps=3, batch_size=1, progress=False, checkpoint_every=1000, seed=0)
    trainer = Trainer(cases, out, opts, cfg, device="cpu", base=base, controlnet_cfg=cn_cfg)

    # before any step
    batch = draw_batch(cases, 2, cfg.window, torch.Generator().manual_seed(5), opts)
    x_t, t, _ = trainer.loss.noisy(batch["x0"], torch.Generator().manual_seed(6))
    args = (x_t, t, batch["coords"], batch["anatomy"], batch["region"])
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
    assert cfg["kind"] == "controlnet" and cfg["task"] == "superres" and cfg["control_channels"] == 1
    assert cfg["base_sha256"] == sha256_file(tiny_model_dir / "model.safetensors")
    assert cfg["params"] == {"factor": [2, 1, 1]}
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
    assert pred.controlnet.cfg.params == {"factor": [2, 1, 1]}
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
def test_thick_slices_are_block_means():
    x = torch.arange(5 * 4 * 7, dtype=torch.float32).reshape(5, 4, 7) ** 1.5
    out = thick_slices(x, (2, 1, 3))
    assert out.shape == (2, 4, 2)  # trailing voxels that fill no block are dropped
    expect = x[:4, :, :6].numpy().reshape(2, 2, 4, 1, 2, 3).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-6)
    assert torch.equal(thick_slices(x, (1, 1, 1)), x)
    with pytest.raises(ValueError, match="positive"):
        thick_slices(x, (0, 1, 1))
    with pytest.raises(ValueError, match="smaller than one block"):
        thick_slices(x, (6, 1, 1))


def test_upsample_blocks_centres_blocks_on_their_fine_voxels():
    f = 4
    low = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 3, 2).clone()
    up = upsample_blocks(low, (f, 1, 1), (5 * f, 3, 2))
    assert up.shape == (20, 3, 2)
    p = torch.arange(20, dtype=torch.float32)
    expect = ((p - (f - 1) / 2) / f).clamp(0, 4)  # block n's centre is fine index n f + (f - 1) / 2
    torch.testing.assert_close(up[:, 0, 0], expect)
    # a linear ramp comes back from its block means away from the ends
    torch.testing.assert_close(thick_slices(up, (f, 1, 1))[1:-1], low[1:-1])
    # fine voxels past the last block take the edge; a shorter shape crops
    longer = upsample_blocks(low, (f, 1, 1), (23, 3, 2))
    assert longer.shape == (23, 3, 2) and torch.equal(longer[20:], longer[19:20].expand(3, 3, 2))
    assert torch.equal(upsample_blocks(low, (f, 1, 1), (18, 3, 2)), up[:18])


def test_upsample_blocks_matches_the_regridded_geometry():
    """On an oblique 4 mm grid, the upsampled values of a linear function of position are that
    function at the centres of geometry.regrid's 1 mm voxels: the two agree on where voxels are."""
    rot = make_ijk_to_ras((1.0, 1.0, 1.0), direction=np.linalg.qr(np.array([[1.0, 2, 0], [0, 1, 3], [2, 0, 1]]))[0])
    m = make_ijk_to_ras((4.0, 1.0, 1.0), (5.0, -3.0, 2.0), rot[:3, :3])
    shape = (5, 4, 3)
    w = np.array([0.3, -0.2, 0.7])

    def field(mat, shp):
        k, j, i = np.meshgrid(*[np.arange(n) for n in shp], indexing="ij")
        ras = voxel_to_ras(mat, np.stack([i.ravel(), j.ravel(), k.ravel()], 1))
        return (ras @ w).reshape(shp)

    fine_m, fine_shape = regrid(m, shape, (1.0, 1.0, 1.0))
    assert fine_shape == (20, 4, 3)
    up = upsample_blocks(torch.from_numpy(field(m, shape)).float(), (4, 1, 1), fine_shape).numpy()
    inner = slice(2, 18)  # between the first and last coarse slice centres
    np.testing.assert_allclose(up[inner], field(fine_m, fine_shape)[inner], atol=1e-4)


def test_superres_condition_is_thick_then_upsampled():
    x = torch.rand(8, 6, 6, generator=torch.Generator().manual_seed(0))
    c = superres_condition(x, FACTOR)
    assert c.shape == (1, 8, 6, 6)
    assert torch.equal(c[0], upsample_blocks(thick_slices(x, FACTOR), FACTOR, x.shape))


def test_lesion_condition_channels():
    img = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(4, 5, 6, dtype=torch.bool)
    mask[1:3, 2:4, 1:5] = True
    c = lesion_condition(img, mask)
    assert c.shape == (2, 4, 5, 6) and c.dtype == torch.float32
    assert torch.equal(c[0], mask.float())
    assert torch.equal(c[1][~mask], img[~mask])
    assert torch.all(c[1][mask] == BLANK_VALUE)
    # no lesion: the mask channel is zero and the image is whole
    c0 = lesion_condition(img, torch.zeros_like(mask))
    assert not c0[0].any() and torch.equal(c0[1], img)


def test_lesion_phantom_cases(tiny_model_dir):
    cfg = load_base(tiny_model_dir).cfg
    (case,) = lesion_phantom_cases(1, cfg, seed=4, lesions=2, regions=("abdomen",), fov_mm=(24.0, 48.0, 48.0),
                                   p_healthy=0.0)
    assert case.control.shape == (2, 24, 48, 48)
    mask = case.control[0] > 0
    assert mask.any() and torch.equal(case.control, lesion_condition(case.image, mask))
    assert torch.equal(case.focus, torch.nonzero(mask))  # crops are steered to the lesions


# ----------------------------------------------------------------------------- CLI
def test_cli_finetune_then_superres(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "cn"
    rc = cli.main(["finetune", "--task", "superres", "--base", str(tiny_model_dir), "--phantoms", "2",
                   "--steps", "2", "--phantom-fov", "24", "32", "32", "--factor", "2", "1", "1", "--batch-size", "1",
                   "--out", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 0
    assert "finetune (superres): 2 steps" in capsys.readouterr().out
    cfg = json.loads((out / "model" / "config.json").read_text(encoding="utf-8"))
    assert cfg["kind"] == "controlnet" and cfg["params"] == {"factor": [2, 1, 1]}
    assert cfg["base_sha256"] == sha256_file(tiny_model_dir / "model.safetensors")

    ph = make_phantom("abdomen", shape_kji=(5, 12, 12), spacing_kji=(2.0, 1.0, 1.0), seed=8, noise_hu=10.0)
    ct = tmp_path / "ct.nii.gz"
    io.write_volume(ct, ph.volume())
    sr = tmp_path / "sr.nii.gz"
    rc = cli.main(["superres", str(ct), "-o", str(sr), "--model", str(tiny_model_dir), "--controlnet",
                   str(out / "model"), "--device", "cpu", "--quiet", "--region", "abdomen", "--steps", "1"])
    assert rc == 0
    vol = io.read_volume(sr)
    assert vol.shape == (10, 12, 12)
    np.testing.assert_allclose(vol.spacing_kji, (1.0, 1.0, 1.0), atol=1e-5)
