"""ControlNet conditions: slab means, slab interpolation, parabolic slabs, factor channels."""

import numpy as np
import pytest
import torch

from MedDiffFMLib.conditions import (BLANK_VALUE, lesion_condition, slab_interpolate, slab_means,
                                     slab_parabolic, slab_reconstruct, superres_condition,
                                     superres_training_condition)
from MedDiffFMLib.geometry import make_ijk_to_ras, regrid, voxel_to_ras


def test_slab_means_along_k():
    x = torch.arange(7 * 4 * 3, dtype=torch.float32).reshape(7, 4, 3) ** 1.5
    out = slab_means(x, 3)
    assert out.shape == (2, 4, 3)  # the trailing partial slab is dropped
    torch.testing.assert_close(out, x[:6].reshape(2, 3, 4, 3).mean(1))
    np.testing.assert_allclose(slab_means(x.numpy(), 3), out.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="fewer than one slab"):
        slab_means(x, 8)


def test_slab_interpolation_centres_and_edges():
    f = 4
    thick = torch.arange(5, dtype=torch.float64)[:, None, None].expand(5, 3, 2).clone()
    up = slab_interpolate(thick, f)
    assert up.shape == (20, 3, 2)
    p = torch.arange(20, dtype=torch.float64)
    torch.testing.assert_close(up[:, 0, 0], ((p + 0.5) / f - 0.5).clamp(0, 4))


def test_slab_interpolation_matches_the_regridded_geometry():
    """On an oblique grid, interpolating a linear function of position from thick slices gives
    that function at the centres of geometry.regrid's thin slices (between the end centres)."""
    rot = np.linalg.qr(np.array([[1.0, 2, 0], [0, 1, 3], [2, 0, 1]]))[0]
    m = make_ijk_to_ras((5.0, 0.8, 0.7), (5.0, -3.0, 2.0), rot)
    shape = (6, 4, 3)
    w = np.array([0.3, -0.2, 0.7])

    def field(mat, shp):
        k, j, i = np.meshgrid(*[np.arange(n) for n in shp], indexing="ij")
        ras = voxel_to_ras(mat, np.stack([i.ravel(), j.ravel(), k.ravel()], 1))
        return (ras @ w).reshape(shp)

    fine_m, fine_shape = regrid(m, shape, (1.0, 0.8, 0.7))
    assert fine_shape == (30, 4, 3)
    up = slab_interpolate(torch.from_numpy(field(m, shape)), 5).numpy()
    inner = slice(3, 27)
    np.testing.assert_allclose(up[inner], field(fine_m, fine_shape)[inner], atol=1e-9)


@pytest.mark.parametrize("factor", [2, 3, 5, 6])
def test_parabolic_slabs_keep_every_slab_mean_and_add_no_extrema(factor):
    g = torch.Generator().manual_seed(factor)
    thick = torch.randn(9, 4, 5, generator=g, dtype=torch.float64) * 300 - 200  # air to bone, in or out of any window
    thin = slab_parabolic(thick, factor)
    assert thin.shape == (9 * factor, 4, 5) and thin.dtype == torch.float64
    torch.testing.assert_close(slab_means(thin, factor), thick, atol=1e-9, rtol=0)
    # no new extrema: each thin slice lies between the lowest and highest of its slab and the two beside it
    padded = torch.cat([thick[:1], thick, thick[-1:]])
    low = torch.minimum(torch.minimum(padded[:-2], padded[1:-1]), padded[2:]).repeat_interleave(factor, 0)
    high = torch.maximum(torch.maximum(padded[:-2], padded[1:-1]), padded[2:]).repeat_interleave(factor, 0)
    assert bool((thin >= low - 1e-9).all()) and bool((thin <= high + 1e-9).all())


def test_parabolic_slabs_are_exact_on_ramps_and_keep_a_step_inside_its_slab():
    f = 4
    k = torch.arange(40, dtype=torch.float64)
    ramp = (3.0 * k - 20)[:, None, None].expand(40, 2, 3)
    torch.testing.assert_close(slab_parabolic(slab_means(ramp, f), f)[2 * f:-2 * f], ramp[2 * f:-2 * f])
    step = torch.where(k < 22, 0.0, 100.0).double()[:, None, None].expand(40, 2, 3)  # jumps inside slab 5 (thin 20-23)
    thick = slab_means(step, f)
    parabolic, linear = slab_parabolic(thick, f), slab_interpolate(thick, f)
    outside = torch.cat([torch.arange(20), torch.arange(24, 40)])
    torch.testing.assert_close(parabolic[outside], step[outside], atol=1e-9, rtol=0)  # the plateaus stay exact
    assert float((linear[outside] - step[outside]).abs().max()) > 10  # interpolation spreads the jump over two slabs
    assert float((parabolic - step).norm()) < 0.9 * float((linear - step).norm())


def test_superres_condition_channels():
    interp = torch.rand(12, 3, 2, generator=torch.Generator().manual_seed(2)) * 2 - 1
    c = superres_condition(interp, 3)
    assert c.shape == (3, 12, 3, 2) and c.dtype == torch.float32
    assert torch.equal(c[0], interp)
    torch.testing.assert_close(c[1], torch.full_like(interp, np.log2(3) / np.log2(6)))
    torch.testing.assert_close(c[2, :6, 0, 0], torch.tensor([-1 / 3, 0, 1 / 3] * 2))
    assert not torch.equal(superres_condition(interp, 4)[1], c[1])  # the factor is told


def test_superres_training_condition_simulates_thick_slices():
    thin = torch.rand(14, 4, 4, generator=torch.Generator().manual_seed(3))
    c = superres_training_condition(thin, 4)  # new ControlNets learn on the parabolic reconstruction
    assert c.shape == (3, 14, 4, 4) and c.dtype == torch.float32
    thick = slab_means(thin, 4)
    expect = slab_parabolic(thick, 4).float()
    torch.testing.assert_close(c[0, :12], expect)
    torch.testing.assert_close(slab_means(c[0, :12], 4), thick, atol=1e-6, rtol=0)  # it explains the thick slices
    torch.testing.assert_close(c[0, 12:], expect[-1:].expand(2, 4, 4))
    linear = superres_training_condition(thin, 4, "linear")  # what older ControlNets were trained on
    torch.testing.assert_close(linear[0, :12], slab_interpolate(thick, 4))
    assert float((linear[0] - c[0]).abs().max()) > 1e-3


def test_slab_reconstruct_refuses_an_unknown_interpolation():
    with pytest.raises(ValueError, match="interpolation must be one of"):
        slab_reconstruct(torch.zeros(3, 2, 2), 2, "cubic")


def test_lesion_condition_channels():
    img = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(4, 5, 6, dtype=torch.bool)
    mask[1:3, 2:4, 1:5] = True
    c = lesion_condition(img, mask)
    assert c.shape == (2, 4, 5, 6) and c.dtype == torch.float32
    assert torch.equal(c[0], mask.float())
    assert torch.equal(c[1][~mask], img[~mask])
    assert torch.all(c[1][mask] == BLANK_VALUE)
    c0 = lesion_condition(img, torch.zeros_like(mask))
    assert not c0[0].any() and torch.equal(c0[1], img)
