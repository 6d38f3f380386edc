"""Training: multi-level samples, condition dropout, learning, EMA, exact resume, checkpoints (DDP:
test_training_ddp.py)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from MedDiffFMLib import anatomy
from MedDiffFMLib.checkpoint import load_base, read_config
from MedDiffFMLib.networks import NULL_REGION, REGION_INDEX, preset
from MedDiffFMLib.training import Case, Trainer, TrainOptions, draw_batch, draw_sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_helpers import grid_coords, linear, small_trainer, structured_cases  # noqa: E402


# ------------------------------------------------------------------------------- multi-level samples
SHAPE = (24, 20, 6)
WINDOW = 8


@pytest.fixture
def ramp_case():
    c = grid_coords(SHAPE)
    groups = torch.zeros(SHAPE, dtype=torch.int8)
    groups[:12] = 2 + anatomy.GROUP_NAMES.index("bone")
    groups[12:] = 1
    return Case(linear(c).float(), (2.5, 0.8, 0.7), groups, region=2)


def test_image_level_sample_spans_the_whole_volume(ramp_case):
    s = draw_sample(ramp_case, WINDOW, torch.Generator().manual_seed(0), level=0)
    assert s["x0"].shape == (1, WINDOW, WINDOW, WINDOW)
    assert s["coords"].shape == (3, WINDOW, WINDOW, WINDOW)
    assert s["anatomy"].shape == (anatomy.NUM_CHANNELS, WINDOW, WINDOW, WINDOW)
    torch.testing.assert_close(s["coords"], grid_coords((WINDOW,) * 3))
    # the resized image is still the same function of the coordinates
    torch.testing.assert_close(s["x0"][0], linear(s["coords"]), atol=1e-5, rtol=0)
    assert int(s["region"]) == 2
    assert torch.all(s["anatomy"][-1] == 1)  # the "anatomy given" flag
    # one sample voxel covers (volume / window) case voxels: the image level is coarse
    torch.testing.assert_close(s["spacing"], torch.tensor([2.5 * SHAPE[0] / WINDOW, 0.8 * SHAPE[1] / WINDOW,
                                                           0.7 * SHAPE[2] / WINDOW]))


def test_sample_voxel_size_per_level(ramp_case):
    gen = torch.Generator().manual_seed(1)
    native = draw_sample(ramp_case, WINDOW, gen, level=2)["spacing"]
    torch.testing.assert_close(native, torch.tensor([2.5, 0.8, 0.7]))
    double = draw_sample(ramp_case, WINDOW, gen, level=1)["spacing"]
    crop = [min(2 * WINDOW, n) for n in SHAPE]
    torch.testing.assert_close(double, torch.tensor([s * c / WINDOW for s, c in zip((2.5, 0.8, 0.7), crop)]))


def test_warm_start_keeps_an_earlier_network_and_zeroes_new_input_channels(make_tiny_model):
    from MedDiffFMLib.networks import FoundationUNet
    from MedDiffFMLib.training import warm_start

    old = make_tiny_model(3)
    sd = old.state_dict()
    key = "unet.conv_in.conv.weight"
    sd[key] = sd[key][:, :-3].clone()  # an earlier network without the voxel-size channels
    new = FoundationUNet(old.cfg)
    assert warm_start(new, sd) == []
    w = new.state_dict()[key]
    assert torch.equal(w[:, :-3], sd[key]) and not w[:, -3:].any()
    assert all(torch.equal(v, sd[k]) for k, v in new.state_dict().items() if k != key)


def test_cpu_bf16_training_step_is_finite(tmp_path):
    cfg = preset("tiny", window=8)
    opts = TrainOptions(steps=2, batch_size=2, lr=1e-3, progress=False, precision="bf16", checkpoint_every=10_000)
    trainer = Trainer(structured_cases(), tmp_path, opts, cfg, device="cpu")
    assert trainer.use_bf16 and trainer.channels_last
    losses = trainer.train()
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "model" / "model.safetensors")).values())


@pytest.mark.parametrize("seed", range(4))
def test_native_crop_has_the_whole_volume_coordinates(ramp_case, seed):
    s = draw_sample(ramp_case, WINDOW, torch.Generator().manual_seed(seed), level=2)
    coords = s["coords"]
    full = grid_coords(SHAPE)
    # where is the crop? read the start back from the first voxel's coordinates
    k0 = int(round((float(coords[0, 0, 0, 0]) + 1) / 2 * (SHAPE[0] - 1)))
    j0 = int(round((float(coords[1, 0, 0, 0]) + 1) / 2 * (SHAPE[1] - 1)))
    assert 0 <= k0 <= SHAPE[0] - WINDOW and 0 <= j0 <= SHAPE[1] - WINDOW
    sl = (slice(k0, k0 + WINDOW), slice(j0, j0 + WINDOW), slice(0, SHAPE[2]))
    # along k and j the window lies inside the volume: exact whole-volume coordinates and values
    torch.testing.assert_close(coords[:, :, :, :SHAPE[2]], full[(slice(None), *sl)], atol=1e-6, rtol=0)
    assert torch.equal(s["x0"][0, :, :, :SHAPE[2]], ramp_case.image[sl])
    assert torch.equal(s["anatomy"][:, :, :, :SHAPE[2]], anatomy.group_channels(ramp_case.groups[sl][None])[0])
    # the i axis (6 voxels) is shorter than the window: padded, coordinates continue past 1
    step = 2.0 / (SHAPE[2] - 1)
    torch.testing.assert_close(coords[2, 0, 0, SHAPE[2]:], 1.0 + step * torch.arange(1, WINDOW - SHAPE[2] + 1),
                               atol=1e-6, rtol=0)
    assert torch.equal(s["x0"][0, :, :, -1], s["x0"][0, :, :, SHAPE[2] - 1])


@pytest.mark.parametrize("seed", range(4))
def test_double_crop_coordinates_span_the_right_sub_range(ramp_case, seed):
    s = draw_sample(ramp_case, WINDOW, torch.Generator().manual_seed(seed), level=1)
    coords = s["coords"]
    assert s["x0"].shape == (1, WINDOW, WINDOW, WINDOW)
    for axis, n in enumerate(SHAPE):
        line = coords[axis].movedim(axis, 0)[:, 0, 0]
        crop = min(2 * WINDOW, n)
        span = 2.0 * (crop - 1) / (n - 1)
        assert float(line[-1] - line[0]) == pytest.approx(span, abs=1e-5)
        assert float(line[0]) >= -1 - 1e-6 and float(line[-1]) <= 1 + 1e-6
        torch.testing.assert_close(line, torch.linspace(float(line[0]), float(line[-1]), WINDOW))
        # the start lies on a voxel of the whole volume
        start = (float(line[0]) + 1) / 2 * (n - 1)
        assert start == pytest.approx(round(start), abs=1e-4)
    torch.testing.assert_close(s["x0"][0], linear(coords), atol=1e-5, rtol=0)


def test_case_without_labels_gets_the_null_anatomy():
    case = Case(torch.zeros(10, 10, 10), region=3)
    for level in range(3):
        s = draw_sample(case, WINDOW, torch.Generator().manual_seed(level), level)
        assert s["anatomy"].shape == (anatomy.NUM_CHANNELS, WINDOW, WINDOW, WINDOW)
        assert not s["anatomy"].any()


def test_condition_dropout_and_level_rates():
    shape = (12, 12, 12)
    c = grid_coords(shape)
    case = Case(linear(c).float(), groups=torch.ones(shape, dtype=torch.int8), region=2)
    opts = TrainOptions(p_drop_region=0.3, p_drop_anatomy=0.6, level_probs=(0.5, 0.3, 0.2))
    n = 1200
    batch = draw_batch([case], n, 4, torch.Generator().manual_seed(0), opts)
    assert batch["x0"].shape == (n, 1, 4, 4, 4)
    region_dropped = float((batch["region"] == NULL_REGION).float().mean())
    anatomy_dropped = float((batch["anatomy"].flatten(1).amax(1) == 0).float().mean())
    assert region_dropped == pytest.approx(0.3, abs=0.06)
    assert anatomy_dropped == pytest.approx(0.6, abs=0.06)
    assert set(batch["region"].tolist()) == {0, 2}
    # the level shows in the coordinate span along k: 2 (image), 14/11 (double crop), 6/11 (native)
    span = batch["coords"][:, 0, -1, 0, 0] - batch["coords"][:, 0, 0, 0, 0]
    rates = [float((span - v).abs().lt(1e-4).float().mean()) for v in (2.0, 14 / 11, 6 / 11)]
    assert sum(rates) == pytest.approx(1.0)
    for got, want in zip(rates, (0.5, 0.3, 0.2)):
        assert got == pytest.approx(want, abs=0.06)


def test_train_options_are_validated():
    with pytest.raises(ValueError):
        TrainOptions(steps=0)
    with pytest.raises(ValueError):
        TrainOptions(level_probs=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        TrainOptions(precision="fp8")
    with pytest.raises(ValueError, match="no training cases"):
        Trainer([], "unused", TrainOptions(), preset("tiny"), device="cpu")


def test_manifest_cases_from_a_folder_and_a_json_manifest(tmp_path):
    """Real-CT training data: images on their own grids (no resampling), labels from a
    ``labels/`` folder of the same names or from the manifest, regions as given or guessed."""
    from MedDiffFMLib import io
    from MedDiffFMLib.phantoms import make_phantom
    from MedDiffFMLib.training import manifest_cases

    cfg = preset("tiny")
    (tmp_path / "labels").mkdir()
    spacings = {"a.nii.gz": (2.5, 0.8, 0.7), "b.nii.gz": (1.0, 1.2, 1.2)}
    for i, (name, spacing) in enumerate(spacings.items()):
        ph = make_phantom("abdomen", shape_kji=(6, 16, 16), spacing_kji=spacing, seed=i, noise_hu=5.0)
        io.write_volume(tmp_path / name, ph.volume())
        if name == "a.nii.gz":
            io.write_volume(tmp_path / "labels" / name, ph.label_volume(), label_names=ph.label_names)
    cases = manifest_cases(tmp_path, cfg, default_region="abdomen")
    assert [c.name for c in cases] == list(spacings)
    for c, spacing in zip(cases, spacings.values()):
        np.testing.assert_allclose(c.spacing, spacing, rtol=1e-5)
        assert tuple(c.image.shape) == (6, 16, 16) and float(c.image.abs().max()) <= 1.0
    assert cases[0].groups is not None and int(cases[0].groups.max()) > 0 and cases[1].groups is None
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps([{"image": "b.nii.gz", "labels": "labels/a.nii.gz", "region": "chest"}]),
                        encoding="utf-8")
    (case,) = manifest_cases(manifest, cfg)
    assert case.region == REGION_INDEX["chest"] and case.groups is not None
    with pytest.raises(ValueError, match="without 'image'"):
        manifest.write_text(json.dumps([{"labels": "x"}]), encoding="utf-8")
        manifest_cases(manifest, cfg)


def test_adult_phantom_cases_sit_on_clinical_oblique_grids():
    """The adult family: a sub-box of an adult-sized body within the voxel budget, at voxel sizes
    inside the model's clinical range, on the grid its seed draws (oblique for some seeds)."""
    from MedDiffFMLib.phantoms import training_phantom
    from MedDiffFMLib.training import clinical_range, draw_phantom, phantom_cases

    cfg = preset("tiny", spacing_range_mm=(0.6, 3.0))
    cases = phantom_cases(4, cfg, seed=5, max_voxels=24 ** 3)
    lo, hi = clinical_range(cfg)
    for i, c in enumerate(cases):
        assert c.image.numel() <= 24 ** 3 and min(c.image.shape) >= 16
        assert all(lo - 1e-6 <= s <= hi + 1e-6 for s in c.spacing), c.spacing
        assert c.name.startswith("phantom-adult-") and c.groups.shape == c.image.shape
        assert float(c.image.min()) >= -1 and float(c.image.max()) <= 1
    obliques = [not np.allclose(np.abs(draw_phantom(5 + i, "chest", cfg, max_voxels=24 ** 3).ijk_to_ras[:3, :3]) > 1e-9,
                                np.eye(3, dtype=bool)) for i in range(6)]
    assert any(obliques)
    # the body keeps its adult size: the same seed on its own grid matches the training family's case
    ph = draw_phantom(5, "head_neck", cfg, max_voxels=24 ** 3)
    ref = training_phantom(5, "head_neck", spacing_kji=ph.spacing_kji, max_voxels=24 ** 3, max_samples=4 * 24 ** 3,
                           lesions=0)
    np.testing.assert_array_equal(ph.hu, ref.hu)
    with pytest.raises(ValueError, match="phantom family"):
        draw_phantom(5, "chest", cfg, family="toy")


# ------------------------------------------------------------------------------- learning, EMA
LEARN_STEPS = 60


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model trained briefly on three phantoms at 4-8 mm (at most 16 x 40 x 40 voxels)."""
    from MedDiffFMLib.training import phantom_cases

    cfg = preset("tiny", spacing_range_mm=(4.0, 8.0))
    cases = phantom_cases(3, cfg, fov_mm=(64.0, 160.0, 160.0), family="miniature")
    assert all(4.0 <= s <= 5.0 for c in cases for s in c.spacing)
    out = tmp_path_factory.mktemp("trained")
    opts = TrainOptions(steps=LEARN_STEPS, batch_size=2, lr=2e-3, ema_decay=0.99, checkpoint_every=10_000,
                        log_every=10, progress=False, seed=0)
    trainer = Trainer(cases, out, opts, cfg, device="cpu")
    losses = trainer.train()
    return trainer, losses, out


def test_loss_falls_on_phantoms(trained):
    trainer, losses, out = trained
    assert len(losses) == LEARN_STEPS and all(np.isfinite(losses))
    first, last = float(np.mean(losses[:10])), float(np.mean(losses[-20:]))
    assert last < 0.8 * first, (first, last)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["step"] for e in log] == list(range(10, LEARN_STEPS + 1, 10))
    assert log[-1]["loss"] == pytest.approx(losses[-1])


def test_model_directory_holds_the_ema(trained):
    trainer, losses, out = trained
    saved = load_file(str(out / "model" / "model.safetensors"))
    raw = trainer.model.state_dict()
    assert set(saved) == set(raw) == set(trainer.ema)
    for k, v in saved.items():
        assert torch.equal(v, trainer.ema[k].to(v.dtype)), k
    floating = [k for k, v in raw.items() if v.is_floating_point()]
    differ = [k for k in floating if not torch.equal(raw[k], trainer.ema[k])]
    assert len(differ) > 0.9 * len(floating)
    cfg = read_config(out / "model")
    assert cfg["kind"] == "base" and cfg["meta"]["steps"] == LEARN_STEPS
    assert cfg["spacing_range_mm"] == [4.0, 8.0]
    model = load_base(out / "model")
    for k, v in model.state_dict().items():
        assert torch.equal(v, trainer.ema[k]), k


# ------------------------------------------------------------------------------- exact resume
def test_resume_continues_exactly(tmp_path):
    straight = small_trainer(tmp_path / "straight", 6)
    losses_straight = straight.train()

    first = small_trainer(tmp_path / "split", 3)
    losses_first = first.train()
    assert (tmp_path / "split" / "training_state" / "state.json").is_file()
    second = small_trainer(tmp_path / "split", 6)
    assert not all(torch.equal(a, b) for a, b in zip(second.model.state_dict().values(),
                                                      first.model.state_dict().values()))
    second.resume()
    assert second.step == 3
    losses_second = second.train()

    assert losses_first + losses_second == losses_straight
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(straight.ema[k], second.ema[k]) for k in straight.ema)
    oa, ob = straight.optimizer.state_dict(), second.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for idx in oa["state"]:
        for name, v in oa["state"][idx].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][idx][name])), (idx, name)
    assert torch.equal(straight.gen.get_state(), second.gen.get_state())
    ma = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    mb = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    assert all(torch.equal(ma[k], mb[k]) for k in ma)


def test_resume_refuses_another_world_size(tmp_path):
    small_trainer(tmp_path, 1).train()
    state = json.loads((tmp_path / "training_state" / "state.json").read_text(encoding="utf-8"))
    state["world"] = 2
    (tmp_path / "training_state" / "state.json").write_text(json.dumps(state), encoding="utf-8")
    with pytest.raises(ValueError, match="2 processes"):
        small_trainer(tmp_path, 2).resume()


def test_checkpoint_every_n_steps(tmp_path):
    out = tmp_path / "does" / "not" / "exist"
    seen = {}

    def on_step(step, loss):
        state = out / "training_state" / "state.json"
        seen[step] = json.loads(state.read_text(encoding="utf-8"))["step"] if state.is_file() else None

    trainer = small_trainer(out, 5, checkpoint_every=2)
    trainer.train(on_step)
    # on_step runs before the checkpoint of its own step
    assert seen == {1: None, 2: None, 3: 2, 4: 2, 5: 4}
    assert (out / "model" / "config.json").is_file()
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "training_state" / "state.safetensors").is_file()
    assert json.loads((out / "training_state" / "state.json").read_text(encoding="utf-8"))["step"] == 5
    assert read_config(out / "model")["meta"]["steps"] == 5
    assert not [p for p in (out).iterdir() if p.name.startswith(".")]  # no temporary leftovers
