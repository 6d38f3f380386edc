"""Whole-volume patch-wise sampling, the windows: one window, blending, any size, coordinates and
voxel size."""

import math

import pytest
import torch

from MedDiffFMLib import anatomy
from MedDiffFMLib.diffusion import step
from MedDiffFMLib.networks import NULL_REGION, preset
from MedDiffFMLib.sampling import (Condition, PatchSampler, SamplerOptions, axis_coordinates, blend_weight,
                                   coarse_to_fine)

from sampler_helpers import Recorder, diffs_k, global_coords, noise  # noqa: E402


# ------------------------------------------------------------------------------- (1) one window
def test_one_window_equals_the_single_window_and_coarse_to_fine_paths(tiny_predictor):
    opts = SamplerOptions(steps=3, seed=7)
    sampler = PatchSampler(tiny_predictor, opts)
    shape = (16, 16, 16)
    groups = torch.zeros(shape, dtype=torch.int8)
    groups[4:12, 3:13, 2:14] = 2 + anatomy.GROUP_NAMES.index("liver")
    cond = Condition(spacing=(2.0, 1.0, 1.0), region=3, anatomy=groups)
    out = sampler.sample(shape, cond)
    fine, coarse = coarse_to_fine(sampler, cond, shape, refine_fraction=0.5, gen=sampler.generator())
    assert torch.equal(out, fine) and torch.equal(fine, coarse)  # a volume of one window: one pass

    # the same chain written out by hand: one network call on the whole volume per step
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=gen)
    axis = axis_coordinates(16, 16)
    torch.testing.assert_close(axis, torch.linspace(-1.0, 1.0, 16), atol=1e-6, rtol=0)
    coords = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))[None]
    anat = anatomy.group_channels(groups[None])
    ts = sampler.schedule.timesteps(3)
    with torch.no_grad():
        for i, t in enumerate(ts):
            eps = tiny_predictor(x[None, None], torch.tensor([t]), coords, anat, torch.tensor([3]),
                                 torch.tensor([[2.0, 1.0, 1.0]]))[0, 0]
            x, _ = step(sampler.schedule, x, eps, t, ts[i + 1] if i + 1 < len(ts) else -1, 0.0, gen, True)
    assert torch.equal(out, x)


# ------------------------------------------------------------------------------- (2) blending
def test_blend_weight_is_positive_separable_and_partitions_unity():
    sampler = PatchSampler(Recorder(cfg=preset("tiny")), SamplerOptions(overlap=0.25))
    lay = sampler.layout((40, 16, 16))
    win, padded, slices = lay.window, lay.padded, lay.slices
    assert win == (16, 16, 16) and padded == (40, 16, 16)
    assert [s[0].start for s in slices] == [0, 12, 24]
    w = blend_weight(lay)
    assert w.shape == win and w.dtype == torch.float32
    assert (w > 0).all()
    # separable: every k profile is proportional to every other
    prof = w[:, 8, 8] / w[:, 8, 8].max()
    torch.testing.assert_close(w[:, 0, 3] / w[:, 0, 3].max(), prof)
    # window edges weigh little, the middle fully
    assert prof[0] < 0.1 and prof[-1] < 0.1 and prof[6:10].min() > 0.99
    total = torch.zeros(40)
    for sl in slices:
        total[sl[0]] += prof
    # the summed weight is flat: the ramps of neighbours complement each other
    torch.testing.assert_close(total[4:36], torch.ones(32), atol=1e-5, rtol=0)


def test_agreeing_windows_blend_exactly():
    # windows whose estimates agree (a function of the whole-volume coordinates) blend to it
    def field(x_t, t, coords, anat, region):
        return (0.7 * torch.sin(math.pi * coords[:, :1]) + 0.3 * coords[:, 1:2] * coords[:, 2:3]) + 0 * x_t

    shape = (40, 23, 9)
    fake = Recorder(fn=field, cfg=preset("tiny"))
    eps = PatchSampler(fake, SamplerOptions(overlap=0.25, batch_size=3)).predict_eps(noise(shape), 500, Condition())
    c = global_coords(shape)
    expected = 0.7 * torch.sin(math.pi * c[0]) + 0.3 * c[1] * c[2]
    torch.testing.assert_close(eps, expected, atol=1e-5, rtol=0)
    assert len(fake.calls) == math.ceil(len(fake.windows()) / 3)


def _window_offset_field(x_t, t, coords, anat, region):
    # each window disagrees with its neighbours by a constant that depends on where it is
    return (3.0 * coords[:, :1, :1, :1, :1] + 1.0).expand_as(x_t).clone()


def test_no_seam_where_windows_disagree():
    fake = Recorder(fn=_window_offset_field, cfg=preset("tiny"))
    blended = PatchSampler(fake, SamplerOptions(overlap=0.25)).predict_eps(torch.zeros(40, 16, 16), 500, Condition())
    offsets = sorted({float(w[1][0, 0, 0, 0]) * 3 + 1 for w in fake.windows()})
    jump = max(b - a for a, b in zip(offsets, offsets[1:]))
    steps = (blended[1:] - blended[:-1]).abs()
    # the disagreement is spread over the overlap, not dumped at one plane
    assert steps.max() < 0.45 * jump
    assert torch.all(blended[1:] - blended[:-1] >= -1e-6)  # monotone transition between increasing offsets

    # a hard tiling (no overlap, constant weights) shows the whole disagreement at one plane
    fake = Recorder(fn=_window_offset_field, cfg=preset("tiny"))
    hard = PatchSampler(fake, SamplerOptions(overlap=0.0)).predict_eps(torch.zeros(48, 16, 16), 500, Condition())
    hard_steps = diffs_k(hard)
    assert [s[0].start for s in PatchSampler(fake, SamplerOptions(overlap=0.0)).layout((48, 16, 16)).slices] == [0, 16, 32]
    hard_offsets = sorted({float(w[1][0, 0, 0, 0]) * 3 + 1 for w in fake.windows()})
    assert torch.isclose(hard_steps[15], torch.tensor(hard_offsets[1] - hard_offsets[0]))
    assert hard_steps[15] > 2.2 * steps.max() * (hard_offsets[1] - hard_offsets[0]) / jump


def test_window_edge_artefacts_are_blended_away():
    # padding errors at the faces of every window (like zero padding in the convolutions)
    def edge_artefact(x_t, t, coords, anat, region):
        out = torch.zeros_like(x_t)
        out[:, :, 0] = 1.0
        out[:, :, -1] = 1.0
        return out

    fake = Recorder(fn=edge_artefact, cfg=preset("tiny"))
    eps = PatchSampler(fake, SamplerOptions(overlap=0.25)).predict_eps(torch.zeros(40, 16, 16), 500, Condition())
    # window faces inside the volume (12, 15, 24, 27) are covered by a neighbour's interior,
    # everywhere across the plane, the volume's own faces included
    for k in (12, 15, 24, 27):
        assert eps[k].abs().max() < 0.1, (k, float(eps[k].abs().max()))
    assert torch.equal(eps[0], torch.ones(16, 16))  # the volume face itself has nothing better


def test_seam_ratio_with_the_network(tiny_predictor):
    shape = (40, 16, 16)
    sampler = PatchSampler(tiny_predictor, SamplerOptions(overlap=0.25))
    eps = sampler.predict_eps(noise(shape, 3), 400, Condition(region=2))
    d = diffs_k(eps)
    border = [11, 15, 23, 27]  # planes between k and k + 1 where a window starts or ends
    inside = [z for z in range(3, 36) if all(abs(z - b) > 1 for b in border)]
    ratio = float(d[border].mean() / d[inside].mean())
    assert ratio < 1.5, ratio


def test_blended_eps_equals_a_manual_blend_of_windows(tiny_predictor):
    shape = (40, 16, 22)
    x = noise(shape, 4)
    groups = torch.randint(0, 5, shape, generator=torch.Generator().manual_seed(5), dtype=torch.int64).to(torch.int8)
    cond = Condition(region=1, anatomy=groups)
    sampler = PatchSampler(tiny_predictor, SamplerOptions(overlap=0.25, batch_size=4))
    eps = sampler.predict_eps(x, 321, cond)
    lay = sampler.layout(shape)
    padded, slices = lay.padded, lay.slices
    assert padded == shape and len(slices) == 3 * 1 * 2
    weight = blend_weight(lay)
    coords = global_coords(shape)
    acc = torch.zeros(shape)
    wsum = torch.zeros(shape)
    with torch.no_grad():
        for sl in slices:
            e = tiny_predictor(x[sl][None, None], torch.tensor([321]), coords[(slice(None), *sl)][None],
                               anatomy.group_channels(groups[sl][None]), torch.tensor([1]),
                               torch.tensor([[1.0, 1.0, 1.0]]))[0, 0]
            acc[sl] += weight * e
            wsum[sl] += weight
    torch.testing.assert_close(eps, acc / wsum, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- (3) any size
@pytest.mark.parametrize("shape", [(5, 5, 5), (17, 9, 13), (3, 40, 7), (1, 1, 1), (1, 20, 2)])
def test_any_size(tiny_predictor, shape):
    rec = Recorder(tiny_predictor)
    out = PatchSampler(rec, SamplerOptions(steps=2, seed=1)).sample(shape, Condition(region=2))
    assert out.shape == shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 1.0 + 1e-6  # the last step returns the clipped clean estimate
    m = tiny_predictor.cfg.downsampling
    for x, *_ in rec.windows():
        assert all(s % m == 0 and s <= tiny_predictor.cfg.window for s in x.shape)


def test_window_option_is_rounded_to_the_unet_multiple(tiny_predictor):
    assert PatchSampler(tiny_predictor, SamplerOptions(window=11)).window == 10
    assert PatchSampler(tiny_predictor, SamplerOptions(window=1)).window == 2
    rec = Recorder(tiny_predictor)
    out = PatchSampler(rec, SamplerOptions(steps=1, window=8)).sample((12, 8, 8), Condition())
    assert out.shape == (12, 8, 8)
    assert all(tuple(x.shape) == (8, 8, 8) for x, *_ in rec.windows())


# ------------------------------------------------------------------------------- (9) coordinates
@pytest.mark.parametrize("shape", [(40, 16, 24), (16, 33, 16)])
def test_each_window_gets_its_place_in_the_whole_volume(tiny_predictor, shape):
    rec = Recorder(tiny_predictor)
    sampler = PatchSampler(rec, SamplerOptions(batch_size=2))
    x = noise(shape, 9)
    sampler.predict_eps(x, 100, Condition())
    slices = sampler.layout(shape).slices
    windows = rec.windows()
    assert len(windows) == len(slices) > 1
    full = global_coords(shape)
    for (xw, coords, anat, region, t), sl in zip(windows, slices):
        torch.testing.assert_close(coords, full[(slice(None), *sl)], atol=1e-6, rtol=0)
        assert torch.equal(xw, x[sl])
        assert region == NULL_REGION and t == 100 and not anat.any()


def test_padded_windows_and_coordinate_ranges(tiny_predictor):
    rec = Recorder(tiny_predictor)
    sampler = PatchSampler(rec, SamplerOptions())
    x = noise((5, 16, 16), 2)
    cond = Condition(coord_range=[(-0.5, 0.5), (0.0, 1.0), (-1.0, 1.0)])
    eps = sampler.predict_eps(x, 50, cond)
    assert eps.shape == (5, 16, 16)
    (xw, coords, *_), = rec.windows()
    assert xw.shape == (6, 16, 16)
    torch.testing.assert_close(coords[0, :5, 0, 0], torch.linspace(-0.5, 0.5, 5))
    assert coords[0, 5, 0, 0] == pytest.approx(0.75)  # the padding voxel continues the axis
    torch.testing.assert_close(coords[1, 0, :, 0], torch.linspace(0.0, 1.0, 16))
    assert torch.equal(xw[5], x[4])  # edge padding


# ------------------------------------------------------------------------------- (10) voxel size
def test_inverse_weight_sum_is_the_accumulated_weight():
    from MedDiffFMLib.sampling import inverse_weight_sum, make_layout

    lay = make_layout((40, 23, 30), 16, 2, 0.3)
    total = torch.zeros(lay.padded)
    w = blend_weight(lay)
    for sl in lay.slices:
        total[sl] += w
    torch.testing.assert_close(inverse_weight_sum(lay), 1.0 / total, rtol=1e-5, atol=0)


def test_every_window_is_told_the_clamped_voxel_size(tiny_predictor):
    rec = Recorder(tiny_predictor)
    lo, hi = tiny_predictor.cfg.spacing_range_mm
    PatchSampler(rec, SamplerOptions(batch_size=2)).predict_eps(noise((40, 16, 16)), 10,
                                                               Condition(spacing=(hi * 3, 0.8, lo / 4)))
    assert len(rec.calls) > 1
    for c in rec.calls:
        assert torch.equal(c["spacing"], torch.tensor([[hi, 0.8, lo]] * c["x"].shape[0]))
