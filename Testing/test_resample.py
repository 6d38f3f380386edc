"""The fast resampler against preprocessing's (map_coordinates) on oblique, anisotropic grids.

Stated tolerances (``range`` = max - min of the input):

* linear, grids sharing their axes (separable path): |fast - reference| <= 1e-6 * range;
* linear, rotated grids (grid_sample path): <= 2e-5 * range (float32 coordinates);
* nearest: identical, except at voxels whose source position lies within 1e-6 voxel of a
  half-way tie between two voxels, where the reference itself depends on rounding noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedDiffFMLib import preprocessing, resample
from MedDiffFMLib.geometry import make_ijk_to_ras, regrid

from conftest import OBLIQUE_ORIGIN_RAS, OBLIQUE_SPACING_KJI, rotation_about_axis

SEPARABLE_TOL = 1e-6
GENERAL_TOL = 2e-5
TIE = 1e-6


def _oblique() -> np.ndarray:
    """Oblique (0.6 rad about (1, 2, 3)), j flipped, spacing (2.5, 0.8, 0.7) mm."""
    direction = rotation_about_axis((1.0, 2.0, 3.0), 0.6) @ np.diag([1.0, -1.0, 1.0])
    return make_ijk_to_ras(OBLIQUE_SPACING_KJI, OBLIQUE_ORIGIN_RAS, direction)


def _smooth_ct(shape, seed=0) -> np.ndarray:
    """CT-like values: smooth structures from -1000 to 1500 HU plus noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = np.where(x ** 2 + y ** 2 < 0.7, 40.0, -1000.0)
    bone = np.where((x - 0.2) ** 2 + (y + 0.1) ** 2 + z ** 2 < 0.05, 1500.0, 0.0)
    return (body + bone + rng.normal(0, 20, shape)).astype(np.float32)


def _ties(src, dst, shape) -> np.ndarray:
    lin, off = resample.index_mapping(src, dst)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")).reshape(3, -1).astype(np.float64)
    coords = lin @ idx + off[:, None]
    frac = coords - np.floor(coords)
    return np.any(np.abs(frac - 0.5) < TIE, axis=0).reshape(shape)


def _compare(src_array, src, shape, dst, order, tol):
    ref = preprocessing.resample_to_grid(src_array, src, shape, dst, order=order)
    got = resample.resample_to_grid(src_array, src, shape, dst, order=order)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    if order == 1:
        span = float(src_array.max() - src_array.min())
        assert float(np.abs(got.astype(np.float64) - ref).max()) <= tol * span
    else:
        differ = got != ref
        assert not np.any(differ & ~_ties(src, dst, shape))
        assert differ.mean() < 0.05
    return got, ref


@pytest.mark.parametrize("order", [0, 1])
def test_model_grid_and_back_match_the_reference_on_an_oblique_anisotropic_grid(order):
    src = _oblique()
    image = _smooth_ct((14, 30, 33))
    if order == 0:
        image = np.rint(image / 100).astype(np.int16)
    model_m, model_shape = regrid(src, image.shape, (1.0, 1.0, 1.0))
    assert resample.is_separable(resample.index_mapping(src, model_m)[0])
    on_model, _ = _compare(image, src, model_shape, model_m, order, SEPARABLE_TOL)
    _compare(on_model, model_m, image.shape, src, order, SEPARABLE_TOL)  # back to the input grid
    ref, ref_m = preprocessing.resample(image, src, (1.3, 0.9, 1.1), order=order)
    got, got_m = resample.resample(image, src, (1.3, 0.9, 1.1), order=order)
    np.testing.assert_array_equal(got_m, ref_m)
    if order == 1:
        assert float(np.abs(got - ref).max()) <= SEPARABLE_TOL * float(np.ptp(image))
    else:
        assert not np.any((got != ref) & ~_ties(src, got_m, got.shape))


@pytest.mark.parametrize("order", [0, 1])
def test_rotated_grids_match_the_reference_including_the_fill_outside(order):
    src = _oblique()
    image = _smooth_ct((14, 30, 33), seed=1)
    if order == 0:
        image = (image > 0).astype(np.uint8) * 7
    # another direction and spacing, shifted so that part of it lies outside the source
    dst = make_ijk_to_ras((1.7, 1.1, 0.9), np.asarray(OBLIQUE_ORIGIN_RAS) + (8.0, -5.0, 6.0),
                          rotation_about_axis((0.3, 1.0, -0.5), 0.7))
    assert not resample.is_separable(resample.index_mapping(src, dst)[0])
    got, ref = _compare(image, src, (20, 26, 24), dst, order, GENERAL_TOL)
    outside = ref == (0 if order == 0 else preprocessing.AIR_HU)
    assert outside.any() and not outside.all()
    if order == 1:  # the fill value marks exactly the voxels outside the source
        np.testing.assert_array_equal(got == preprocessing.AIR_HU, outside)


def test_dtype_rules_and_the_same_grid_returns_the_input_itself():
    src = _oblique()
    mask = np.zeros((6, 9, 8), dtype=bool)
    mask[2:4, 3:7, 2:6] = True
    m, shape = regrid(src, mask.shape, (1.0, 1.0, 1.0))
    out = resample.resample_to_grid(mask, src, shape, m, order=0)
    assert out.dtype == bool and out.any()
    np.testing.assert_array_equal(out, preprocessing.resample_to_grid(mask, src, shape, m, order=0))
    image = _smooth_ct((6, 9, 8))
    assert resample.resample_to_grid(image, src, image.shape, src.copy()) is image
    read_only = image.copy()
    read_only.flags.writeable = False  # what the tasks hand over: read, never written
    resample.resample_to_grid(read_only, src, shape, m, order=1)
    with pytest.raises(ValueError, match="order"):
        resample.resample_to_grid(image, src, shape, m, order=2)


def test_cubic_is_the_reference_itself():
    src = make_ijk_to_ras(OBLIQUE_SPACING_KJI, OBLIQUE_ORIGIN_RAS)
    image = _smooth_ct((6, 10, 9))
    m, shape = regrid(src, image.shape, (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(resample.resample_to_grid(image, src, shape, m, order=3),
                                  preprocessing.resample_to_grid(image, src, shape, m, order=3))
