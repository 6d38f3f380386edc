"""Phantom family v2: variation switches, slab profile, RAS geometry, training cases, lesion variety."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from MedDiffFMLib import anatomy
from MedDiffFMLib.phantoms import (
    LESION_ORGANS,
    Variation,
    insert_lesions,
    make_phantom,
    training_phantom,
)
from MedDiffFMLib.phantoms.render import sample_matrix, sampling_factors

NAME_TO_LABEL = {name: value for value, name in anatomy.DEFAULT_LABEL_NAMES.items()}


def _rotation(axis, angle: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _matrix(directions: np.ndarray, spacing_kji, shape_kji, centre_ras) -> np.ndarray:
    """IJK -> RAS with unit direction columns (i, j, k), the volume centre at ``centre_ras``."""
    m = np.eye(4)
    m[:3, :3] = directions * np.array(spacing_kji[::-1], float)
    m[:3, 3] = np.asarray(centre_ras, float) - m[:3, :3] @ ((np.array(shape_kji[::-1], float) - 1) / 2)
    return m


AXIAL = np.diag([-1.0, -1.0, 1.0])  # DICOM-like: i to the left, j posterior, k superior


# ------------------------------------------------------------------------------ variation switches
def test_all_variation_off_gives_one_nominal_phantom_whatever_the_seed():
    """Every seed-drawn difference is covered by a switch: with all off, seeds agree."""
    a = make_phantom("abdomen", (12, 32, 32), (3.0, 2.0, 2.0), seed=1, noise_hu=0.0, variation=Variation.none())
    b = make_phantom("abdomen", (12, 32, 32), (3.0, 2.0, 2.0), seed=2, noise_hu=0.0, variation=Variation.none())
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.clean_hu, b.clean_hu)
    assert a.phase == "native"
    c = make_phantom("abdomen", (12, 32, 32), (3.0, 2.0, 2.0), seed=2, noise_hu=0.0)
    assert not np.array_equal(a.clean_hu, c.clean_hu)


@pytest.mark.parametrize("switch", [f.name for f in dataclasses.fields(Variation)])
def test_each_variation_switch_changes_the_output(switch):
    # 3 mm slices: the slab has sub-samples; 2.5 mm pixels: the footprint has them too.
    args = dict(region="abdomen", shape_kji=(10, 28, 28), spacing_kji=(3.0, 2.5, 2.5), noise_hu=0.0)
    seed = 3
    on = make_phantom(seed=seed, **args)
    assert on.phase != "native"  # precondition for the contrast-phase switch
    off = make_phantom(seed=seed, variation=dataclasses.replace(Variation(), **{switch: False}), **args)
    assert not np.array_equal(on.clean_hu, off.clean_hu)
    if switch in ("deformation", "organs", "habitus"):
        assert not np.array_equal(on.labels, off.labels)  # these move anatomy
    if switch in ("texture", "contrast_phase"):
        assert np.array_equal(on.labels, off.labels)  # these change appearance only
    if switch in ("partial_volume", "slab_profile"):
        # labels are taken at the voxel centres; only the field interpolation between the
        # coarse evaluation points (which follow the sub-sample grid) moves a few of them
        assert np.mean(on.labels == off.labels) > 0.98
    if switch != "contrast_phase":
        assert off.phase == on.phase  # one switch changes only what it covers


def test_sampling_factors_follow_the_switches():
    assert sampling_factors((5.0, 0.7, 0.7), Variation()) == (5, 1, 1)
    assert sampling_factors((2.5, 3.5, 0.8), Variation()) == (3, 3, 1)
    assert sampling_factors((1.0, 1.0, 1.0), Variation()) == (1, 1, 1)
    assert sampling_factors((5.0, 3.0, 3.0), Variation(slab_profile=False, partial_volume=False)) == (1, 1, 1)


# ------------------------------------------------------------------------------ slab profile
@pytest.mark.parametrize("oblique", [False, True])
def test_slab_profile_is_the_mean_of_point_samples_along_k(oblique):
    """A 3 mm slice equals the mean of 1 mm point samples at its three sub-sample positions."""
    shape, spacing = (6, 24, 20), (3.0, 1.5, 1.5)
    directions = _rotation((0.3, 1.0, 0.2), 0.5) @ AXIAL if oblique else AXIAL
    matrix = _matrix(directions, spacing, shape, (10.0, -20.0, 0.0))
    fov_fill = None if oblique else 0.85  # also the adult-sized body on an oblique grid
    thick = make_phantom("chest", shape, spacing, seed=3, ijk_to_ras=matrix, noise_hu=0.0, fov_fill=fov_fill)
    assert sampling_factors(spacing, Variation())[0] == 3
    # the point-sampled grid through the sub-sample positions: 1 mm along k, same pixels
    thin_matrix = sample_matrix(matrix, (3, 1, 1))
    thin = make_phantom("chest", (18, 24, 20), (1.0, 1.5, 1.5), seed=3, ijk_to_ras=thin_matrix, noise_hu=0.0,
                        fov_fill=fov_fill, variation=Variation(slab_profile=False))
    if not oblique:  # the miniature body is placed by the grid's centre: the same for both
        np.testing.assert_allclose(thin_matrix @ [9.5, 11.5, 8.5, 1], matrix @ [9.5, 11.5, 2.5, 1], atol=1e-9)
    slab_mean = thin.clean_hu.reshape(6, 3, 24, 20).mean(axis=1)
    np.testing.assert_allclose(thick.clean_hu, slab_mean, atol=2e-3)
    assert np.array_equal(thick.labels, thin.labels[1::3])  # labels at the slice centres
    # and it is not a point sample: the slab mean differs from the central thin slice
    assert np.abs(thick.clean_hu - thin.clean_hu[1::3]).max() > 50.0


# ------------------------------------------------------------------------------ RAS geometry
def _labels_at(ph, points_ras: np.ndarray) -> np.ndarray:
    """Nearest-voxel labels of ``ph`` at RAS points (N, 3); 0 outside its grid."""
    ijk = (np.linalg.inv(ph.ijk_to_ras) @ np.c_[points_ras, np.ones(len(points_ras))].T)[:3].T
    kji = np.rint(ijk[:, ::-1]).astype(int)
    inside = np.all((kji >= 0) & (kji < np.array(ph.labels.shape)), axis=1)
    out = np.zeros(len(points_ras), ph.labels.dtype)
    out[inside] = ph.labels[tuple(kji[inside].T)]
    return out


def test_a_structure_lands_at_the_same_ras_place_whatever_the_grid():
    centre = (-20.0, 10.0, 60.0)  # upper abdomen of the adult body (liver, spine)
    ref_shape, ref_spacing = (40, 48, 48), (2.0, 2.0, 2.0)
    ref = make_phantom("abdomen", ref_shape, ref_spacing, seed=8, noise_hu=0.0, fov_fill=None,
                       ijk_to_ras=_matrix(AXIAL, ref_spacing, ref_shape, centre))
    shape, spacing = (12, 52, 50), (4.0, 1.6, 1.5)  # oblique, anisotropic, smaller field of view
    m = _matrix(_rotation((1.0, -0.4, 0.6), 0.45) @ AXIAL, spacing, shape, centre)
    obl = make_phantom("abdomen", shape, spacing, seed=8, noise_hu=0.0, fov_fill=None, ijk_to_ras=m)
    kk, jj, ii = np.nonzero(np.ones(shape, bool))
    pts = (m @ np.c_[ii, jj, kk, np.ones(ii.size)].T)[:3].T
    seen = _labels_at(ref, pts)
    inside_ref = np.all(np.abs(pts - centre) < [46.0, 46.0, 38.0], axis=1)  # well inside the axial grid
    mine = obl.labels.ravel()
    for name in ("liver", "body"):
        v = NAME_TO_LABEL[name]
        a, b = (mine == v) & inside_ref, (seen == v) & inside_ref
        assert a.sum() > 500, name
        dice = 2 * np.count_nonzero(a & b) / (a.sum() + b.sum())
        assert dice > 0.9, (name, dice)
    # the oblique grid is not the axial one: its voxels see the body at other positions
    assert not np.array_equal(obl.labels, make_phantom("abdomen", shape, spacing, seed=8, noise_hu=0.0,
                                                       fov_fill=None).labels)


# ------------------------------------------------------------------------------ training cases
def test_training_phantom_is_seeded_noise_free_and_bounded():
    a = training_phantom(3, max_voxels=32 ** 3)
    b = training_phantom(3, max_voxels=32 ** 3)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.ijk_to_ras, b.ijk_to_ras)
    assert np.array_equal(a.hu, a.clean_hu)  # training images stay noise-free
    cases = [training_phantom(s, max_voxels=32 ** 3) for s in range(6)]
    assert len({c.region for c in cases}) >= 2
    assert len({c.spacing_kji for c in cases}) == len(cases)
    for c in cases:
        assert c.hu.size <= 32 ** 3 and min(c.hu.shape) >= 16
        sp = np.array(c.spacing_kji)
        assert np.all((sp >= 0.5) & (sp <= 5.0)), sp
        assert np.all(np.isfinite(c.hu)) and c.hu.dtype == np.float32
        for value, name in c.label_names.items():
            assert anatomy.DEFAULT_LABEL_NAMES[value] == name and anatomy.group_of(name) is not None
    # anisotropic voxels and oblique directions occur
    assert any(c.spacing_kji[0] > 1.5 * c.spacing_kji[2] for c in cases)
    dirs = [c.ijk_to_ras[:3, :3] / np.array(c.spacing_kji[::-1]) for c in cases]
    assert any(not np.allclose(np.abs(d), np.eye(3), atol=1e-6) for d in dirs)
    for d in dirs:
        np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-9)


def test_training_phantom_takes_what_it_is_given():
    ph = training_phantom(11, region="chest", spacing_kji=(2.5, 0.8, 0.8), shape_kji=(8, 20, 24), lesions=0)
    assert ph.region == "chest" and ph.hu.shape == (8, 20, 24) and not ph.lesion_mask.any()
    np.testing.assert_allclose(ph.spacing_kji, (2.5, 0.8, 0.8))
    small = training_phantom(12, max_voxels=20 ** 3)
    assert small.hu.size <= 20 ** 3
    with pytest.raises(ValueError, match="unknown region"):
        training_phantom(1, region="pelvis")
    with pytest.raises(ValueError, match="seed"):
        training_phantom(-1)
    with pytest.raises(ValueError, match="max_voxels"):
        training_phantom(1, max_voxels=10 ** 3)


# ------------------------------------------------------------------------------ lesion variety
def test_lesions_span_sizes_signs_shapes_and_stay_in_organs():
    base = make_phantom("abdomen", (40, 64, 64), (2.5, 1.2, 1.2), seed=6, noise_hu=0.0, fov_fill=None,
                        ijk_to_ras=_matrix(AXIAL, (2.5, 1.2, 1.2), (40, 64, 64), (-40.0, 20.0, 60.0)))
    organs = set(LESION_ORGANS["abdomen"]) & set(base.label_names.values())
    assert "liver" in organs
    found = []
    for seed in range(4):
        out = insert_lesions(base, 3, seed, radius_mm=(1.5, 15.0), contrast_hu=(10.0, 80.0))
        diff = out.clean_hu - base.clean_hu
        assert np.all(np.isin(base.labels[out.lesion_mask], [NAME_TO_LABEL[o] for o in organs]))
        for les in out.lesions:
            assert 0.0 < les.radius_mm <= 15.0 and 10.0 <= abs(les.contrast_hu) <= 80.0  # thin organs shrink it
            assert les.kind in ("round", "irregular") and les.voxels > 0
            centre = np.array(les.center_kji)
            np.testing.assert_allclose(les.center_ras, (base.ijk_to_ras @ [*centre[::-1], 1.0])[:3])
        # each lesion's mask shifts HU by at least half its contrast, with its sign
        assert np.all(np.sign(diff[out.lesion_mask]) != 0)
        found += out.lesions
    assert {np.sign(les.contrast_hu) for les in found} == {-1.0, 1.0}
    assert {les.kind for les in found} == {"round", "irregular"}
    radii = [les.radius_mm for les in found]
    assert min(radii) < 6.0 and max(radii) > 9.0


def test_a_thin_lesion_is_faint_in_a_thick_slice():
    """Partial volume along k: a 4 mm lesion in 5 mm slices changes HU by less than its contrast."""
    hu = np.full((9, 40, 40), 50.0, np.float32)
    labels = np.full(hu.shape, NAME_TO_LABEL["liver"], np.uint8)
    thick, mask_t, les_t = insert_lesions((hu, labels), 1, 2, spacing_kji=(5.0, 0.8, 0.8), radius_mm=(2.0, 2.0),
                                          contrast_hu=(60.0, 60.0), sign=-1, kinds=("round",))
    thin, mask_f, les_f = insert_lesions((hu, labels), 1, 2, spacing_kji=(0.8, 0.8, 0.8), radius_mm=(2.0, 2.0),
                                         contrast_hu=(60.0, 60.0), sign=-1, kinds=("round",))
    assert (thin - hu).min() < -50.0  # in thin slices the lesion reaches its contrast
    assert -50.0 < (thick - hu).min() < -5.0  # in 5 mm slices it is averaged with the liver around it
    assert les_f[0].center_ras is None  # bare arrays have no RAS frame


def test_canvas_boxes_hold_every_sample_of_their_frame_box():
    """Boxes are tightened with coarse coordinates; on a deformed oblique canvas they still
    contain every sample whose frame point lies in the asked box."""
    from MedDiffFMLib.phantoms.canvas import Canvas, Placement

    m = _matrix(_rotation((0.2, 1.0, 0.5), 0.6) @ AXIAL, (2.0, 0.9, 1.1), (30, 40, 36), (5.0, -8.0, 12.0))
    cv = Canvas(m, (30, 40, 36), Placement((0.0, 0.0, 0.0), 60.0, 0.05, (0.0, 0.1, 0.0)), (0.06, 0.03),
                seed=4, stream=2)
    assert cv.dmax > 0.05
    g = np.random.default_rng(0)
    for _ in range(40):
        c = g.uniform(-0.5, 0.5, 3)
        r = g.uniform(0.02, 0.25, 3)
        sl = cv.box(c[0] - r[0], c[0] + r[0], c[1] - r[1], c[1] + r[1], c[2] - r[2], c[2] + r[2])
        inside = (np.abs(cv.U - c[0]) < r[0]) & (np.abs(cv.V - c[1]) < r[1]) & (np.abs(cv.T - c[2]) < r[2])
        if sl is None:
            assert not inside.any()
            continue
        held = np.zeros_like(inside)
        held[sl] = True
        assert not np.any(inside & ~held)
