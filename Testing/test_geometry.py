import numpy as np
import pytest

from MedDiffFMLib.geometry import (
    direction,
    make_ijk_to_ras,
    regrid,
    spacing_kji,
    validate_ijk_to_ras,
    voxel_to_ras,
)
from MedDiffFMLib.volume import Volume

from conftest import euler_rotation


def test_make_and_read_back():
    d = euler_rotation(0.3, -0.5, 1.1)
    m = make_ijk_to_ras((3.0, 0.8, 0.7), (-10.0, 20.0, 5.5), d)
    np.testing.assert_allclose(spacing_kji(m), [3.0, 0.8, 0.7])
    np.testing.assert_allclose(direction(m), d, atol=1e-12)
    np.testing.assert_allclose(m[:3, 3], [-10.0, 20.0, 5.5])
    # column c is the direction of index axis c (i, j, k) times its spacing
    np.testing.assert_allclose(m[:3, 0], d[:, 0] * 0.7)
    np.testing.assert_allclose(m[:3, 2], d[:, 2] * 3.0)
    assert Volume(np.zeros((2, 3, 4), np.float32), m).spacing_kji.tolist() == pytest.approx([3.0, 0.8, 0.7])
    np.testing.assert_allclose(voxel_to_ras(m, [[0, 0, 1]])[0], m[:3, 3] + 3.0 * d[:, 2])


def test_regrid_half_voxel_shift_5mm_to_1mm():
    m = make_ijk_to_ras((5.0, 1.0, 1.0), (0.0, 0.0, 100.0))
    new, shape = regrid(m, (10, 4, 4), (1.0, 1.0, 1.0))
    assert shape == (50, 4, 4)
    # first corner fixed at 100 - 2.5; the first new centre is 0.5 mm inside it, i.e. 2 mm
    # from the old first centre toward the first corner (-k here)
    assert new[2, 3] == pytest.approx(98.0)
    np.testing.assert_allclose(new[:3, :3], np.eye(3))
    # same box: both last corners agree
    old_last_corner = 100.0 + 9 * 5.0 + 2.5
    new_last_corner = new[2, 3] + 49 * 1.0 + 0.5
    assert new_last_corner == pytest.approx(old_last_corner)


def test_regrid_oblique_follows_direction():
    d = euler_rotation(0.2, 0.4, -0.7)
    m = make_ijk_to_ras((5.0, 0.8, 0.6), (3.0, -4.0, 7.0), d)
    new, shape = regrid(m, (6, 10, 12), (1.0, 0.8, 0.6))
    assert shape == (30, 10, 12)
    np.testing.assert_allclose(direction(new), d, atol=1e-12)
    np.testing.assert_allclose(new[:3, 3], m[:3, 3] - 2.0 * d[:, 2], atol=1e-12)


def test_regrid_rounding_keeps_first_corner():
    m = make_ijk_to_ras((3.0, 1.0, 1.0))
    new, shape = regrid(m, (5, 2, 2), (2.0, 1.0, 1.0))  # 15 mm / 2 mm = 7.5 -> 8 slices
    assert shape[0] == 8
    assert new[2, 3] - 1.0 == pytest.approx(-1.5)  # first corner unchanged
    new, shape = regrid(m, (1, 2, 2), (10.0, 1.0, 1.0))
    assert shape[0] == 1  # never fewer than one voxel


def test_validate_errors():
    good = make_ijk_to_ras((1.0, 1.0, 1.0))
    validate_ijk_to_ras(good)
    bad = good.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        validate_ijk_to_ras(bad)
    with pytest.raises(ValueError, match="absurd spacing"):
        validate_ijk_to_ras(make_ijk_to_ras((1e-5, 1.0, 1.0)))
    with pytest.raises(ValueError, match="absurd spacing"):
        validate_ijk_to_ras(make_ijk_to_ras((1.0, 1.0, 1e4)))
    bad = good.copy()
    bad[3, 0] = 1.0
    with pytest.raises(ValueError, match="last row"):
        validate_ijk_to_ras(bad)
    bad = good.copy()
    bad[:3, 1] = bad[:3, 0]
    with pytest.raises(ValueError, match="singular"):
        validate_ijk_to_ras(bad)
    with pytest.raises(ValueError):
        validate_ijk_to_ras(np.eye(3))
    with pytest.raises(ValueError):
        regrid(good, (2, 2, 2), (float("nan"), 1.0, 1.0))
