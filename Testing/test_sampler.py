"""Whole-volume patch-wise sampling, the chains: schedules, partial diffusion, guidance, progress and
cancel, coarse to fine, precision and compile."""

import pytest
import torch

from MedDiffFMLib.networks import NULL_REGION
from MedDiffFMLib.sampling import Condition, PatchSampler, SamplerOptions, coarse_to_fine
from MedDiffFMLib.tasks.base import Cancelled

from sampler_helpers import Recorder, global_coords, noise  # noqa: E402


# ------------------------------------------------------------------------------- (4) schedules
def test_ddim_and_ddpm_seeds_and_step_counts(tiny_predictor):
    shape = (20, 12, 10)

    def run(**kw):
        rec = Recorder(tiny_predictor)
        sampler = PatchSampler(rec, SamplerOptions(**kw))
        out = sampler.sample(shape, Condition(region=3))
        n_windows = len(sampler.layout(shape))
        assert len(rec.windows()) == kw["steps"] * n_windows
        ts = [w[4] for w in rec.windows()][::n_windows]
        assert ts == sampler.schedule.timesteps(kw["steps"])
        return out

    results = {}
    for method in ("ddim", "ddpm"):
        for steps in (1, 4):
            a = run(method=method, steps=steps, seed=11)
            b = run(method=method, steps=steps, seed=11)
            c = run(method=method, steps=steps, seed=12)
            assert torch.equal(a, b), (method, steps)
            assert not torch.allclose(a, c), (method, steps)
            results[method, steps] = a
    assert not torch.allclose(results["ddim", 1], results["ddim", 4])
    assert not torch.allclose(results["ddpm", 4], results["ddim", 4])


def test_eta_one_is_ddpm():
    assert SamplerOptions(method="ddpm").step_eta == 1.0
    assert SamplerOptions(method="ddim").step_eta == 0.0
    assert SamplerOptions(method="ddim", eta=0.5).step_eta == 0.5
    with pytest.raises(ValueError):
        SamplerOptions(method="euler")
    with pytest.raises(ValueError):
        SamplerOptions(overlap=1.0)


# ------------------------------------------------------------------------------- (5) partial diffusion
def test_start_from_a_noised_image(tiny_predictor):
    shape = (16, 12, 20)
    c = global_coords(shape)
    image = 0.5 * torch.sin(2 * c[0]) * torch.cos(3 * c[2]) + 0.2 * c[1]
    sampler = PatchSampler(tiny_predictor, SamplerOptions(steps=2, seed=3))
    near = sampler.sample(shape, Condition(region=2), x_init=image, t_start=10)
    far = sampler.sample(shape, Condition(region=2), x_init=image, t_start=999)
    err_near = float((near - image).abs().mean())
    err_far = float((far - image).abs().mean())
    assert err_near < 0.05, err_near
    assert err_far > 5 * err_near
    with pytest.raises(ValueError, match="x_init shape"):
        sampler.sample((4, 4, 4), Condition(), x_init=image, t_start=10)


# ------------------------------------------------------------------------------- (6) guidance
def test_classifier_free_guidance(tiny_predictor):
    shape = (24, 16, 16)
    x = noise(shape, 8)
    groups = torch.zeros(shape, dtype=torch.int8)
    groups[:, 4:12] = 3
    cond = Condition(region=2, anatomy=groups)

    def eps(scale, c):
        rec = Recorder(tiny_predictor)
        out = PatchSampler(rec, SamplerOptions(guidance_scale=scale)).predict_eps(x, 600, c)
        return out, rec

    e_cond, rec1 = eps(1.0, cond)
    e_null, _ = eps(1.0, Condition(region=NULL_REGION))
    n_windows = len(rec1.windows())
    assert all(w[3] == 2 for w in rec1.windows())  # scale 1: one conditional call per window
    e3, rec3 = eps(3.0, cond)
    assert len(rec3.windows()) == 2 * n_windows
    regions = torch.cat([c["region"] for c in rec3.calls])
    assert int((regions == NULL_REGION).sum()) == n_windows
    assert not torch.allclose(e3, e_cond)
    torch.testing.assert_close(e3, e_null + 3.0 * (e_cond - e_null), atol=1e-4, rtol=1e-4)
    e0, _ = eps(0.0, cond)
    torch.testing.assert_close(e0, e_null, atol=1e-5, rtol=1e-5)

    s1 = PatchSampler(tiny_predictor, SamplerOptions(steps=2, guidance_scale=1.0)).sample(shape, cond)
    s2 = PatchSampler(tiny_predictor, SamplerOptions(steps=2, guidance_scale=2.0)).sample(shape, cond)
    assert not torch.allclose(s1, s2)


# ------------------------------------------------------------------------------- (7) progress, cancel
def test_progress_reports_increase_to_one(tiny_predictor):
    reports = []
    sampler = PatchSampler(tiny_predictor, SamplerOptions(steps=3, batch_size=1))
    sampler.sample((40, 16, 16), Condition(), progress=reports.append)
    fractions = [p.fraction for p in reports]
    assert len(reports) == 3 * 3
    assert all(b > a for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == pytest.approx(1.0)
    assert 0 < fractions[0] < 0.2
    assert reports[-1].step == reports[-1].total_steps == 3
    assert [p.window for p in reports[:3]] == [1, 2, 3] and reports[0].total_windows == 3
    assert reports[-1].eta_s == pytest.approx(0.0, abs=1e-6)


def test_cancel_stops_promptly(tiny_predictor):
    rec = Recorder(tiny_predictor)
    flag = {"cancel": False}

    def on_progress(p):
        flag["cancel"] = True  # the user presses cancel after the first report

    sampler = PatchSampler(rec, SamplerOptions(steps=50, batch_size=1))
    with pytest.raises(Cancelled):
        sampler.sample((40, 16, 16), Condition(), progress=on_progress, cancel=lambda: flag["cancel"])
    assert len(rec.calls) == 1


# ------------------------------------------------------------------------------- (8) multi-level
def test_coarse_to_fine_on_a_volume_larger_than_a_window(tiny_predictor):
    shape = (24, 16, 20)
    rec = Recorder(tiny_predictor)
    reports = []
    sampler = PatchSampler(rec, SamplerOptions(steps=5, seed=5))
    cond = Condition(spacing=(2.5, 0.8, 0.7), region=3)
    out, coarse = coarse_to_fine(sampler, cond, shape, refine_fraction=0.4, gen=sampler.generator(),
                                 progress=reports.append, stage="synthesis")
    assert out.shape == coarse.shape == shape and torch.isfinite(out).all() and not torch.equal(out, coarse)
    windows = rec.windows()
    # whole volume: five steps on one window spanning the whole volume, told its coarse voxel size
    for x, coords, *_ in windows[:5]:
        assert x.shape == (16, 16, 16)
        torch.testing.assert_close(coords, global_coords((16, 16, 16)))
    coarse_spacing = rec.calls[0]["spacing"][0]
    torch.testing.assert_close(coarse_spacing, torch.tensor([2.5 * 24 / 16, 0.8, 0.7 * 20 / 16]))
    # refinement: windows on the full grid at its own voxel size, from 0.4 T down in 0.4 x 5 steps
    refine = windows[5:]
    n = len(sampler.layout(shape))
    assert len(refine) == 2 * n and n > 1
    assert max(w[4] for w in refine) == round(0.4 * 999)
    torch.testing.assert_close(rec.calls[-1]["spacing"][0], torch.tensor([2.5, 0.8, 0.7]))
    fractions = [p.fraction for p in reports]
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    assert fractions[-1] == pytest.approx(1.0)
    assert {p.stage for p in reports} == {"synthesis (whole volume)", "synthesis (refinement)"}


# ------------------------------------------------------------------------------- (11) precision, compile
def test_cpu_bf16_sampling_is_close_to_fp32(tiny_predictor):
    shape = (20, 16, 16)
    x = noise(shape, 6)
    ref = PatchSampler(tiny_predictor, SamplerOptions()).predict_eps(x, 300, Condition(region=2))
    low = PatchSampler(tiny_predictor, SamplerOptions(precision="bf16")).predict_eps(x, 300, Condition(region=2))
    assert low.dtype == torch.float32 and not torch.equal(low, ref)  # really ran in bf16
    rel = float((low - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    assert rel < 0.05, rel


def test_compile_option_compiles_the_network_once(tiny_predictor, monkeypatch):
    compiled = []

    def fake_compile(module, **kwargs):
        compiled.append(module)
        return Recorder(module)

    monkeypatch.setattr(torch, "compile", fake_compile)
    a = PatchSampler(tiny_predictor, SamplerOptions(compile=True))
    b = PatchSampler(tiny_predictor, SamplerOptions(compile=True))
    assert compiled == [tiny_predictor] and a.predictor is b.predictor
    a.predict_eps(noise((16, 16, 16)), 10, Condition())
    assert len(a.predictor.calls) == 1
