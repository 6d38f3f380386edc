import numpy as np
import pytest

from MedDiffFMLib.geometry import make_ijk_to_ras
from MedDiffFMLib.preprocessing import (
    REGION_WINDOWS,
    REGIONS,
    check_region,
    estimate_body_mask,
    guess_region,
    hu_to_unit,
    outside_window,
    resample,
    resample_to_grid,
    unit_to_hu,
    window_bounds,
)


def test_regions_and_aliases():
    assert REGIONS == ("head_neck", "chest", "abdomen")
    assert REGION_WINDOWS["chest"] == (1800.0, -500.0)
    for alias in ["head-and-neck", "headneck", "hn", "HEAD_NECK", " Head Neck "]:
        assert check_region(alias) == "head_neck"
    assert check_region("Chest") == "chest"
    with pytest.raises(ValueError, match="head_neck, chest, abdomen"):
        check_region("pelvis")
    with pytest.raises(ValueError):
        hu_to_unit(np.zeros(3), "auto")


@pytest.mark.parametrize("region", REGIONS)
def test_window_round_trip(region):
    lo, hi = window_bounds(region)
    hu = np.arange(np.ceil(lo), np.floor(hi) + 1, dtype=np.float32)  # every integer HU inside
    x = hu_to_unit(hu, region)
    assert x.dtype == np.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    back = unit_to_hu(x, region)
    assert back.dtype == np.float32
    assert np.array_equal(np.rint(back), hu)  # bit-identical for integer HU
    width, level = REGION_WINDOWS[region]
    assert np.all(np.abs(back - hu) <= 2.0**-24 * (np.abs(hu - level) + np.abs(hu)) * 1.001)
    # non-integer HU: within float32 rounding
    fine = np.linspace(lo, hi, 10001).astype(np.float32)
    err = np.abs(unit_to_hu(hu_to_unit(fine, region), region).astype(np.float64) - fine)
    assert np.all(err <= 2.0**-24 * (np.abs(fine - level) + np.abs(fine)) * 1.001)
    # the window's ends and centre are exact without rounding
    ends = np.array([lo, level, hi], np.float32)
    np.testing.assert_array_equal(hu_to_unit(ends, region), [-1.0, 0.0, 1.0])
    np.testing.assert_array_equal(unit_to_hu(np.array([-1.0, 0.0, 1.0], np.float32), region), ends)


def test_window_clips_and_reports():
    hu = np.array([-3000.0, -1024.0, 0.0, 100.0, 3000.0], np.float32)
    x = hu_to_unit(hu, "abdomen")  # window [-120, 240]
    np.testing.assert_array_equal(x[[0, 1]], [-1.0, -1.0])
    assert x[-1] == 1.0
    np.testing.assert_array_equal(outside_window(hu, "abdomen"), [True, True, False, False, True])
    assert not outside_window(np.array([-120.0, 240.0]), "abdomen").any()


def test_resample_to_grid_identity_is_bit_identical():
    m = make_ijk_to_ras((2.5, 0.7, 0.8), (1.0, 2.0, 3.0))
    a = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    for order in (0, 1, 3):
        out = resample_to_grid(a, m, a.shape, m.copy(), order=order)
        assert np.array_equal(out, a) and out.dtype == a.dtype


def test_resample_superres_along_k():
    m = make_ijk_to_ras((5.0, 1.0, 1.0), (0.0, 0.0, 10.0))
    a = np.zeros((4, 3, 3), np.float32)
    a[:] = np.arange(4, dtype=np.float32)[:, None, None] * 10.0
    out, new = resample(a, m, (1.0, 1.0, 1.0), order=1)
    assert out.shape == (20, 3, 3) and out.dtype == np.float32
    assert new[2, 3] == pytest.approx(8.0)
    # new slice centres 8, 9, ..., 27 mm; old centres 10, 15, 20, 25 mm -> linear in between,
    # edge value beyond the outermost centres (no fill inside the box)
    z = 8.0 + np.arange(20)
    expect = np.clip((z - 10.0) / 5.0, 0, 3) * 10.0
    np.testing.assert_allclose(out[:, 1, 1], expect, atol=1e-5)
    lab = (a > 5).astype(np.uint8)
    out0, _ = resample(lab, m, (1.0, 1.0, 1.0), order=0)
    assert out0.dtype == np.uint8 and set(np.unique(out0)) <= {0, 1}
    out3, _ = resample(a, m, (1.0, 1.0, 1.0), order=3)
    assert out3.shape == (20, 3, 3)


def test_resample_to_oblique_grid_and_fill():
    src = make_ijk_to_ras((1.0, 1.0, 1.0))
    z, y, x = np.mgrid[0:8, 0:9, 0:10].astype(np.float32)
    a = 2.0 * x + 3.0 * y - z  # linear in RAS, so linear interpolation is exact
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    dst = make_ijk_to_ras((1.0, 0.5, 0.5), (3.0, 2.0, 1.0), rot)
    out = resample_to_grid(a, src, (4, 6, 6), dst, order=1, fill=-999.0)
    kk, jj, ii = np.mgrid[0:4, 0:6, 0:6]
    ras = np.einsum("rc,cklm->rklm", dst[:3, :3], np.stack([ii, jj, kk]).astype(float)) + dst[:3, 3, None, None, None]
    expect = 2.0 * ras[0] + 3.0 * ras[1] - ras[2]
    np.testing.assert_allclose(out, expect, atol=1e-4)
    # a grid entirely outside gets the fill value; labels keep their dtype
    far = make_ijk_to_ras((1.0, 1.0, 1.0), (500.0, 0.0, 0.0))
    assert np.all(resample_to_grid(a, src, (2, 2, 2), far, order=1, fill=-999.0) == -999.0)
    assert np.all(resample_to_grid(a, src, (2, 2, 2), far, order=1) == -1024.0)
    lab = resample_to_grid((a > 10).astype(np.int16), src, (2, 2, 2), far, order=0)
    assert lab.dtype == np.int16 and np.all(lab == 0)
    mask = resample_to_grid(a > 10, src, (4, 6, 6), dst, order=0)
    assert mask.dtype == bool


def test_resample_bad_input():
    m = make_ijk_to_ras((1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="3-D"):
        resample(np.zeros((4, 4), np.float32), m, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="3-D"):
        resample_to_grid(np.zeros((2, 3, 4, 5), np.float32), m, (2, 2, 2), m)
    bad = m.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        resample(np.zeros((2, 2, 2), np.float32), bad, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="order"):
        resample(np.zeros((2, 2, 2), np.float32), m, (0.5, 1.0, 1.0), order=2)


def _phantom(kind):
    """Synthetic axial phantoms at 2 mm: 20 slices of 200 x 200 (40 cm field of view)."""
    shape = (20, 200, 200)
    yy, xx = np.mgrid[0:200, 0:200].astype(float) * 2.0 - 200.0  # mm from the centre
    hu = np.full(shape, -1000.0, np.float32)
    if kind == "chest":
        body = (xx / 160) ** 2 + (yy / 110) ** 2 <= 1
        lungs = ((np.abs(xx) - 70) / 50) ** 2 + (yy / 70) ** 2 <= 1
        hu[:, body] = 40.0
        hu[:, lungs] = -850.0
    elif kind == "head":
        r = np.hypot(xx, yy)
        hu[:, r <= 80] = 30.0  # brain, ~200 cm²
        hu[:, (r > 70) & (r <= 76)] = 1200.0  # skull ring
    else:  # abdomen
        body = (xx / 170) ** 2 + (yy / 120) ** 2 <= 1
        hu[:, body] = 50.0
        hu[:, body & ((xx / 155) ** 2 + (yy / 105) ** 2 > 1)] = -100.0  # fat rim
        hu[:, (xx / 15) ** 2 + ((yy + 70) / 15) ** 2 <= 1] = 700.0  # spine
    return hu, make_ijk_to_ras((2.0, 2.0, 2.0))


@pytest.mark.parametrize("kind,region", [("chest", "chest"), ("head", "head_neck"), ("abdomen", "abdomen")])
def test_guess_region(kind, region):
    hu, m = _phantom(kind)
    assert guess_region(hu, m) == region


def test_body_mask():
    hu, _ = _phantom("chest")
    hu[:, 5:10, 5:10] = 100.0  # a small separate object (e.g. table): not the largest component
    body = estimate_body_mask(hu)
    assert body.dtype == bool
    assert not body[:, 5:10, 5:10].any()
    assert body[:, 100, 100 + 35].all()  # inside a lung: filled
    assert not body[:, 100, 5].any()
    assert not estimate_body_mask(np.full((3, 4, 5), -1000.0, np.float32)).any()
