import json
import math

import pytest
import torch

from MedDiffFMLib import anatomy
from MedDiffFMLib.networks import (
    PRESETS,
    ControlNetConfig,
    FoundationUNet,
    ModelConfig,
    NoisePredictor,
    TaskControlNet,
    coordinate_encoding,
    preset,
)


def _inputs(cfg, shape, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 1, *shape), generator=g)
    coords = torch.rand((batch, 3, *shape), generator=g) * 2 - 1
    anat = torch.zeros((batch, cfg.anatomy_channels, *shape))
    anat[:, 0, : shape[0] // 2] = 1.0
    anat[:, -1] = 1.0
    t = torch.tensor([5, 700][:batch] + [0] * max(0, batch - 2))
    region = torch.tensor([1, 3][:batch] + [0] * max(0, batch - 2))
    spacing = torch.tensor([[2.5, 0.7, 0.7], [1.0, 1.0, 1.0]][:batch] + [[1.0, 1.0, 1.0]] * max(0, batch - 2))
    return x, t, coords, anat, region, spacing


# ------------------------------------------------------------------------------- configs
def test_base_preset_is_the_papers_network():
    cfg = preset("base")
    assert cfg.window == 128
    assert cfg.spacing_range_mm[0] <= 1.0 <= cfg.spacing_range_mm[1]  # the paper's 1 mm is in range
    assert cfg.channels[0] == 32
    assert all(b == 2 * a for a, b in zip(cfg.channels, cfg.channels[1:]))
    assert cfg.num_res_blocks == 1
    # attention only at the level whose feature maps are 16^3 for a 128^3 window
    feature_sizes = [cfg.window // 2 ** level for level in range(len(cfg.channels))]
    assert 16 in feature_sizes
    assert cfg.attention_levels == tuple(s == 16 for s in feature_sizes)
    assert sum(cfg.attention_levels) == 1
    assert cfg.num_train_timesteps == 1000
    assert cfg.schedule == "cosine"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_consistent(name):
    cfg = preset(name)
    assert cfg.name == name
    assert cfg.window % cfg.downsampling == 0
    assert cfg.downsampling == 2 ** (len(cfg.channels) - 1)
    assert all(c % cfg.norm_num_groups == 0 for c in cfg.channels)
    # image (1) + coordinates (3) + sin/cos per axis and octave (6 L) + anatomy + voxel size (3)
    assert cfg.in_channels == 1 + 3 + 6 * cfg.coord_frequencies + anatomy.NUM_CHANNELS + 3
    assert cfg.anatomy_channels == anatomy.NUM_CHANNELS


def test_preset_overrides_and_unknown_preset():
    cfg = preset("tiny", window=24, spacing_range_mm=(0.7, 3.0))
    assert (cfg.window, cfg.spacing_range_mm) == (24, (0.7, 3.0))
    assert PRESETS["tiny"].window == 16  # the preset itself is untouched
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")


def test_network_input_width_matches_config():
    cfg = preset("tiny", coord_frequencies=3)
    model = FoundationUNet(cfg)
    assert cfg.in_channels == 1 + 3 + 18 + anatomy.NUM_CHANNELS + 3
    assert model.unet.conv_in.conv.in_channels == cfg.in_channels
    x, t, coords, anat, region, spacing = _inputs(cfg, (4, 4, 4))
    h = model.network_input(x, coords, anat, spacing)
    assert h.shape == (2, cfg.in_channels, 4, 4, 4)
    # the channel order: image, coordinates, encoding, anatomy, voxel size
    assert torch.equal(h[:, :1], x)
    assert torch.equal(h[:, 1:4], coords)
    assert torch.equal(h[:, 4:4 + 18], coordinate_encoding(coords, 3))
    a = anatomy.NUM_CHANNELS
    assert torch.equal(h[:, 4 + 18:4 + 18 + a], anat)
    # log2(mm) / 2 per axis (k, j, i), constant over the window
    torch.testing.assert_close(h[0, -3:, 1, 2, 3], torch.log2(torch.tensor([2.5, 0.7, 0.7])) / 2)
    torch.testing.assert_close(h[1, -3:, 0, 0, 0], torch.zeros(3))
    assert torch.equal(h[:, -3:].amax(dim=(2, 3, 4)), h[:, -3:].amin(dim=(2, 3, 4)))


def test_voxel_size_condition_is_clamped_to_the_trained_range():
    cfg = preset("tiny", spacing_range_mm=(0.5, 5.0))
    assert cfg.clamp_spacing((0.3, 2.0, 9.0)) == (0.5, 2.0, 5.0)


def test_fixed_grid_v1_configs_are_refused_clearly():
    d = preset("tiny").to_dict()
    del d["spacing_range_mm"]
    d["spacing_mm"] = 4.0
    with pytest.raises(ValueError, match="fixed-grid .v1, 4.0 mm. model"):
        ModelConfig.from_dict(d)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_config_json_round_trip(name):
    cfg = preset(name)
    text = cfg.to_json()
    back = ModelConfig.from_dict(json.loads(text))
    assert back == cfg
    assert isinstance(back.channels, tuple) and isinstance(back.attention_levels, tuple)
    assert back.to_json() == text


def test_controlnet_config_round_trip():
    cfg = ControlNetConfig("lesion", 2, preset("tiny"), base_sha256="ab" * 32, params={"factor": 4})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["kind"] == "controlnet"
    back = ControlNetConfig.from_dict(d)
    assert back == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(window=15), "multiple"),                       # 2 levels: window must be even
        (dict(channels=(8, 16, 32), attention_levels=(False, False, True), window=18), "multiple"),
        (dict(channels=(8, 12)), "norm_num_groups"),          # 12 is not divisible by 8 groups
        (dict(channels=(8, 16, 32)), "same length"),          # attention_levels has 2 entries
        (dict(spacing_range_mm=(0.0, 5.0)), "spacing_range_mm"),
        (dict(spacing_range_mm=(5.0, 1.0)), "spacing_range_mm"),
    ],
)
def test_invalid_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **overrides)


def test_unknown_config_keys_are_refused():
    d = preset("tiny").to_dict()
    d["hidden_size"] = 3
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict(d)


# ------------------------------------------------------------------------------- coordinates
def test_coordinate_encoding_shape_and_values():
    L = 3
    g = torch.Generator().manual_seed(1)
    coords = torch.rand((2, 3, 4, 5, 6), generator=g) * 2 - 1
    enc = coordinate_encoding(coords, L)
    assert enc.shape == (2, 6 * L, 4, 5, 6)
    for axis in range(3):
        for level in range(L):
            angle = coords[:, axis] * (2.0 ** level) * math.pi
            torch.testing.assert_close(enc[:, axis * L + level], torch.sin(angle))
            torch.testing.assert_close(enc[:, 3 * L + axis * L + level], torch.cos(angle))
    assert coordinate_encoding(coords, 0).shape == (2, 0, 4, 5, 6)


def test_coordinate_encoding_known_points():
    coords = torch.tensor([-1.0, 0.0, 0.5]).view(1, 3, 1, 1, 1)
    enc = coordinate_encoding(coords, 2)[0, :, 0, 0, 0]
    expected_sin = [math.sin(math.pi * -1), math.sin(2 * math.pi * -1), 0.0, 0.0,
                    math.sin(math.pi * 0.5), math.sin(2 * math.pi * 0.5)]
    expected_cos = [-1.0, 1.0, 1.0, 1.0, math.cos(math.pi * 0.5), math.cos(math.pi)]
    torch.testing.assert_close(enc, torch.tensor(expected_sin + expected_cos), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("shape", [(2, 2, 2), (6, 10, 4), (14, 2, 8)])
def test_forward_shapes_non_cubic(make_tiny_model, shape):
    model = make_tiny_model()
    cfg = model.cfg
    with torch.no_grad():
        eps = model(*_inputs(cfg, shape))
    assert eps.shape == (2, 1, *shape)
    assert torch.isfinite(eps).all()


def test_forward_odd_sizes_with_a_single_level(make_tiny_model):
    # a one-level U-Net has no downsampling: any window size works, odd ones included
    model = make_tiny_model(channels=(8,), attention_levels=(True,), window=7)
    cfg = model.cfg
    assert cfg.downsampling == 1
    with torch.no_grad():
        eps = model(*_inputs(cfg, (7, 5, 3)))
    assert eps.shape == (2, 1, 7, 5, 3)
    assert torch.isfinite(eps).all() and eps.abs().max() > 0


def test_fresh_monai_network_predicts_zero():
    # MONAI zero-initialises the output convolution: the fixtures must randomise it
    torch.manual_seed(0)
    cfg = preset("tiny")
    with torch.no_grad():
        assert torch.count_nonzero(FoundationUNet(cfg).eval()(*_inputs(cfg, (4, 4, 4)))) == 0


def test_forward_depends_on_every_input(make_tiny_model):
    model = make_tiny_model()
    cfg = model.cfg
    x, t, coords, anat, region, spacing = _inputs(cfg, (4, 4, 4))
    with torch.no_grad():
        ref = model(x, t, coords, anat, region, spacing)
        assert not torch.allclose(ref, model(x, t + 100, coords, anat, region, spacing))
        assert not torch.allclose(ref, model(x, t, coords * 0.5, anat, region, spacing))
        assert not torch.allclose(ref, model(x, t, coords, torch.zeros_like(anat), region, spacing))
        assert not torch.allclose(ref, model(x, t, coords, anat, torch.zeros_like(region), spacing))
        assert not torch.allclose(ref, model(x, t, coords, anat, region, spacing * 2))


# ------------------------------------------------------------------------------- ControlNet
def test_controlnet_starts_as_the_identity_exactly(make_tiny_model):
    base = make_tiny_model()
    cfg = base.cfg
    torch.manual_seed(1)
    cn = TaskControlNet(ControlNetConfig("lesion", 2, cfg))
    cn.init_from_base(base)
    cn.eval()
    x, t, coords, anat, region, spacing = _inputs(cfg, (8, 6, 4))
    control = torch.randn((2, 2, 8, 6, 4), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        alone = base(x, t, coords, anat, region, spacing)
        assert alone.abs().min() > 0
        both = NoisePredictor(base, cn)(x, t, coords, anat, region, spacing, control=control)
        assert torch.equal(alone, both)
        # the residuals really were computed and are exactly zero ...
        down, mid = cn(base, x, t, coords, anat, region, spacing, control)
        assert len(down) > 0
        assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) == 0
        # ... and the ControlNet is wired in: non-zero zero-convolutions change the output
        for p in cn.controlnet.controlnet_mid_block.parameters():
            p.add_(0.05)
        changed = NoisePredictor(base, cn)(x, t, coords, anat, region, spacing, control=control)
    assert not torch.allclose(alone, changed)


def test_controlnet_copies_the_base_encoder(make_tiny_model):
    base = make_tiny_model()
    cfg = base.cfg
    cn = TaskControlNet(ControlNetConfig("superres", 1, cfg))
    cn.init_from_base(base)
    own = cn.controlnet.state_dict()
    shared = [k for k in own if not k.startswith("controlnet_")]
    assert shared
    base_sd = base.unet.state_dict()
    for k in shared:
        assert torch.equal(own[k], base_sd[k]), k


def test_controlnet_requires_a_condition():
    torch.manual_seed(0)
    cfg = preset("tiny")
    base = FoundationUNet(cfg).eval()
    cn = TaskControlNet(ControlNetConfig("superres", 1, cfg))
    cn.init_from_base(base)
    with pytest.raises(ValueError, match="control"):
        NoisePredictor(base, cn)(*_inputs(cfg, (2, 2, 2)))
