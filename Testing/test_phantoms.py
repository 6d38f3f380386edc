"""Synthetic CT phantoms: determinism, geometry, HU plausibility, lesions, noise, validation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from MedDiffFMLib import anatomy
from MedDiffFMLib.phantoms import (
    LESION_ORGANS,
    PHASES,
    REGIONS,
    Phantom,
    add_ct_noise,
    default_ijk_to_ras,
    insert_lesions,
    make_phantom,
)
from MedDiffFMLib.volume import Volume

NAME_TO_LABEL = {name: value for value, name in anatomy.DEFAULT_LABEL_NAMES.items()}
LUNG_LABELS = [NAME_TO_LABEL[n] for n in LESION_ORGANS["chest"]]


def _mask(ph: Phantom, *names: str) -> np.ndarray:
    return np.isin(ph.labels, [NAME_TO_LABEL[n] for n in names])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


@pytest.fixture(scope="module")
def phantoms64():
    """One clean-ish 64^3 phantom per region (read-only)."""
    return {r: make_phantom(r, (64, 64, 64), (1.0, 1.0, 1.0), seed=3) for r in REGIONS}


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("region", REGIONS)
def test_same_seed_is_bit_identical(region):
    a = make_phantom(region, (24, 32, 28), (2.0, 1.5, 1.5), seed=11, lesions=2)
    b = make_phantom(region, (24, 32, 28), (2.0, 1.5, 1.5), seed=11, lesions=2)
    assert np.array_equal(a.hu, b.hu)
    assert np.array_equal(a.clean_hu, b.clean_hu)
    assert np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.lesion_mask, b.lesion_mask)
    assert a.label_names == b.label_names
    np.testing.assert_array_equal(a.ijk_to_ras, b.ijk_to_ras)


@pytest.mark.parametrize("region", REGIONS)
def test_seeds_vary_the_anatomy(region):
    phs = [make_phantom(region, (32, 32, 32), (2.0, 2.0, 2.0), seed=s, noise_hu=0.0) for s in range(4)]
    for a, b in zip(phs[:-1], phs[1:]):
        assert not np.array_equal(a.labels, b.labels)
        assert not np.array_equal(a.hu, b.hu)
    # organ size varies per seed (body habitus, organ scale)
    organ = {"head_neck": ("brain",), "chest": tuple(LESION_ORGANS["chest"]), "abdomen": ("liver",)}[region]
    volumes = [np.count_nonzero(_mask(p, *organ)) for p in phs]
    assert min(volumes) > 0
    assert np.std(volumes) / np.mean(volumes) > 0.02


# ------------------------------------------------------------------------------ shapes, geometry
@pytest.mark.parametrize("shape,spacing", [((20, 64, 48), (1.0, 1.0, 1.0)), ((33, 31, 29), (2.5, 0.8, 0.7)),
                                           ((1, 5, 7), (1.0, 1.0, 1.0))])
@pytest.mark.parametrize("region", REGIONS)
def test_shapes_and_dtypes(region, shape, spacing):
    ph = make_phantom(region, shape, spacing, seed=5)
    for arr, dtype in ((ph.hu, np.float32), (ph.clean_hu, np.float32), (ph.labels, np.uint8),
                       (ph.lesion_mask, np.bool_)):
        assert arr.shape == shape
        assert arr.dtype == dtype
    assert np.all(np.isfinite(ph.hu))
    assert ph.ijk_to_ras.shape == (4, 4)
    np.testing.assert_allclose(ph.spacing_kji, spacing)
    assert ph.region == region
    assert set(ph.label_names) == set(np.unique(ph.labels).tolist()) - {0}
    assert not ph.lesion_mask.any()
    vol = ph.volume()
    assert isinstance(vol, Volume) and vol.array is ph.hu
    np.testing.assert_allclose(vol.spacing_kji, spacing)
    assert ph.label_volume().array is ph.labels


def test_default_matrix_centres_the_volume_with_dicom_like_axes():
    m = default_ijk_to_ras((20, 31, 48), (2.5, 0.8, 0.7))
    centre = m @ np.array([(48 - 1) / 2, (31 - 1) / 2, (20 - 1) / 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)
    np.testing.assert_allclose(np.diag(m)[:3], [-0.7, -0.8, 2.5])


def test_anatomy_orientation(phantoms64):
    """i runs to the patient's left, j posterior, k superior (as documented)."""
    chest, abd, head = phantoms64["chest"], phantoms64["abdomen"], phantoms64["head_neck"]
    centre_i = (64 - 1) / 2
    heart = ndimage.center_of_mass(_mask(chest, "heart"))
    assert heart[2] > centre_i  # heart to the left
    liver = ndimage.center_of_mass(_mask(abd, "liver"))
    spleen = ndimage.center_of_mass(_mask(abd, "spleen"))
    assert liver[2] < centre_i < spleen[2]
    spine = ndimage.center_of_mass(_mask(abd, "vertebrae_L1", "vertebrae_L2", "vertebrae_L3"))
    body = ndimage.center_of_mass(abd.labels > 0)
    assert spine[1] > body[1]  # spine posterior
    brain = ndimage.center_of_mass(_mask(head, "brain"))
    thyroid = ndimage.center_of_mass(_mask(head, "thyroid_gland"))
    assert brain[0] > thyroid[0]  # brain superior


def test_oblique_matrix_is_kept_and_orients_the_body():
    """The body lives in RAS: an oblique grid keeps its matrix and sees the body obliquely."""
    spacing = (2.5, 0.8, 0.7)
    c, s = np.cos(0.4), np.sin(0.4)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)],
                                                                   [0, np.sin(0.2), np.cos(0.2)]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([-1.0, -1.0, 1.0]) * np.array(spacing[::-1])  # columns i, j, k
    m[:3, 3] = (-31.5, 17.25, 102.0)
    ph = make_phantom("chest", (16, 40, 44), spacing, seed=2, ijk_to_ras=m)
    np.testing.assert_array_equal(ph.ijk_to_ras, m)
    ref = make_phantom("chest", (16, 40, 44), spacing, seed=2)
    assert not np.array_equal(ph.labels, ref.labels)
    # the same body, seen at another angle: the same organs, about the same amount of them
    assert set(ph.label_names) & set(ref.label_names) >= {NAME_TO_LABEL["heart"], anatomy.BODY_LABEL}
    assert abs(np.count_nonzero(ph.labels) - np.count_nonzero(ref.labels)) < 0.25 * np.count_nonzero(ref.labels)


def test_same_anatomy_at_another_resolution():
    """64^3 at 1 mm and 32^3 at 2 mm cover the same field of view: same anatomy."""
    main = {"head_neck": [("brain",)], "chest": [("heart",), tuple(LESION_ORGANS["chest"])],
            "abdomen": [("liver",), ("stomach",)]}
    for region in REGIONS:
        fine = make_phantom(region, (64, 64, 64), (1.0, 1.0, 1.0), seed=7, noise_hu=0.0)
        coarse = make_phantom(region, (32, 32, 32), (2.0, 2.0, 2.0), seed=7, noise_hu=0.0)
        down = fine.labels[::2, ::2, ::2]  # nearest-neighbour downsampling
        assert _dice(down > 0, coarse.labels > 0) > 0.95, region
        for names in main[region]:
            ids = [NAME_TO_LABEL[n] for n in names]
            d = _dice(np.isin(down, ids), np.isin(coarse.labels, ids))
            assert d > 0.8, (region, names, d)


# ------------------------------------------------------------------------------ labels and HU
@pytest.mark.parametrize("region", REGIONS)
def test_every_label_maps_to_an_anatomy_group(region, phantoms64):
    for ph in (phantoms64[region], make_phantom(region, (40, 48, 48), (1.5, 1.5, 1.5), seed=0)):
        for value, name in ph.label_names.items():
            assert anatomy.DEFAULT_LABEL_NAMES[value] == name
            assert anatomy.group_of(name) is not None, name
        _groups, unknown = anatomy.group_map(ph.labels, ph.label_names)
        assert unknown == []


def test_region_content(phantoms64):
    expected = {
        "head_neck": ["brain", "skull", "spinal_cord", "trachea", "esophagus", "thyroid_gland",
                      "common_carotid_artery_left", "common_carotid_artery_right", "vertebrae_C4"],
        "chest": ["heart", "aorta", "trachea", "esophagus", "spinal_cord", "sternum", "scapula_left",
                  "rib_left_5", "rib_right_5", "vertebrae_T6", *LESION_ORGANS["chest"]],
        "abdomen": ["liver", "spleen", "kidney_left", "kidney_right", "stomach", "pancreas", "aorta",
                    "inferior_vena_cava", "colon", "small_bowel", "autochthon_left", "iliopsoas_right",
                    "vertebrae_L3", "spinal_cord"],
    }
    for region, names in expected.items():
        present = set(phantoms64[region].label_names.values())
        assert set(names) <= present, (region, set(names) - present)
        assert "body" in present


@pytest.mark.parametrize("seed", [0, 1])
def test_hu_ranges(seed):
    abd = make_phantom("abdomen", (64, 64, 64), (1.0, 1.0, 1.0), seed=seed)
    chest = make_phantom("chest", (64, 64, 64), (1.0, 1.0, 1.0), seed=seed)
    head = make_phantom("head_neck", (64, 64, 64), (1.0, 1.0, 1.0), seed=seed)
    assert 40 <= np.median(abd.hu[_mask(abd, "liver")]) <= 80
    assert -950 <= np.median(chest.hu[np.isin(chest.labels, LUNG_LABELS)]) <= -700
    assert 25 <= np.median(head.hu[_mask(head, "brain")]) <= 45
    for ph, bone in ((abd, ("vertebrae_L2", "vertebrae_L3")), (chest, ("vertebrae_T6", "vertebrae_T7")),
                     (head, ("skull",))):
        assert np.median(ph.hu[_mask(ph, *bone)]) > 150
        assert np.median(ph.hu[ph.labels == 0]) < -900
    # gas in the bowel reaches air values; fat is negative, muscle positive
    assert np.min(abd.clean_hu[_mask(abd, "colon", "stomach")]) < -700
    assert np.median(abd.hu[_mask(abd, "autochthon_left", "autochthon_right")]) > 20


def test_contrast_phases_enhance_blood_and_organs():
    args = ("abdomen", (48, 48, 48), (1.5, 1.5, 1.5))
    phs = {ph: make_phantom(*args, seed=4, phase=ph, noise_hu=0.0) for ph in PHASES}
    native, arterial, portal = phs["native"], phs["arterial"], phs["portal_venous"]
    for ph in (arterial, portal):
        assert np.array_equal(native.labels, ph.labels)  # the phase changes HU only
    med = {name: {k: float(np.median(v.hu[_mask(v, name)])) for k, v in phs.items()}
           for name in ("aorta", "liver", "spleen", "portal_vein_and_splenic_vein")}
    assert med["aorta"]["native"] < 60 < 120 < med["aorta"]["portal_venous"] < med["aorta"]["arterial"]
    assert med["liver"]["native"] + 8 < med["liver"]["arterial"] < med["liver"]["portal_venous"] - 20
    assert med["spleen"]["portal_venous"] > med["spleen"]["native"] + 40
    assert med["portal_vein_and_splenic_vein"]["portal_venous"] > med["portal_vein_and_splenic_vein"]["native"] + 80
    assert not native.contrast and arterial.contrast and portal.contrast
    assert [p.phase for p in phs.values()] == list(PHASES)


# ------------------------------------------------------------------------------ noise
def test_noise_std_matches_request():
    ph = make_phantom("chest", (32, 56, 56), (2.0, 1.0, 1.0), seed=1, noise_hu=20.0)
    resid = ph.hu - ph.clean_hu
    assert abs(resid.std() - 20.0) < 1.0
    # flat region: air well outside the body
    air = ndimage.binary_erosion(ph.labels == 0, iterations=3)
    assert air.sum() > 5000
    assert abs(ph.hu[air].std() - 20.0) < 1.5
    assert abs(ph.hu[air].mean() + 1000.0) < 2.0
    clean = make_phantom("chest", (32, 56, 56), (2.0, 1.0, 1.0), seed=1, noise_hu=0.0)
    assert np.array_equal(clean.hu, clean.clean_hu)
    np.testing.assert_array_equal(clean.clean_hu, ph.clean_hu)


def test_add_ct_noise_is_correlated_and_seeded():
    flat = np.zeros((40, 40, 40), np.float32)
    a = add_ct_noise(flat, 15.0, seed=3, spacing_kji=(3.0, 0.7, 0.7), correlation_mm=0.7)
    b = add_ct_noise(flat, 15.0, seed=3, spacing_kji=(3.0, 0.7, 0.7), correlation_mm=0.7)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert abs(a.std() - 15.0) < 0.5
    # neighbours along i are correlated (sigma = 1 voxel), along the thick k axis hardly
    corr_i = np.corrcoef(a[:, :, :-1].ravel(), a[:, :, 1:].ravel())[0, 1]
    corr_k = np.corrcoef(a[:-1].ravel(), a[1:].ravel())[0, 1]
    assert corr_i > 0.5 and abs(corr_k) < 0.1
    assert not np.array_equal(a, add_ct_noise(flat, 15.0, seed=4, spacing_kji=(3.0, 0.7, 0.7)))
    assert np.array_equal(add_ct_noise(flat, 0.0, seed=3), flat)


# ------------------------------------------------------------------------------ lesions
@pytest.mark.parametrize("region", REGIONS)
def test_lesions_inside_organs_and_labels_unchanged(region):
    ph = make_phantom(region, (48, 48, 48), (1.3, 1.3, 1.3), seed=9, lesions=3)
    ref = make_phantom(region, (48, 48, 48), (1.3, 1.3, 1.3), seed=9)
    assert ph.lesion_mask.any()
    assert len(ph.lesions) == 3
    assert np.array_equal(ph.labels, ref.labels)
    organs = _mask(ph, *LESION_ORGANS[region])
    assert np.all(organs[ph.lesion_mask])
    assert sum(les.voxels for les in ph.lesions) >= ph.lesion_mask.sum()
    # HU changed inside the lesions, the noise is kept
    np.testing.assert_allclose(ph.hu - ph.clean_hu, ref.hu - ref.clean_hu, atol=1e-3)
    changed = np.abs(ph.clean_hu - ref.clean_hu) > 1.0
    assert np.count_nonzero(changed & ph.lesion_mask) > 0.9 * ph.lesion_mask.sum()
    if region == "chest":  # solid nodules in aerated lung
        assert np.median(ph.clean_hu[ph.lesion_mask]) > -300


@pytest.mark.parametrize("sign", [1, -1])
def test_lesion_contrast_sign(sign):
    base = make_phantom("abdomen", (64, 64, 64), (1.0, 1.0, 1.0), seed=12, noise_hu=0.0)
    out = insert_lesions(base, 3, seed=5, sign=sign, contrast_hu=(40.0, 60.0))
    diff = out.clean_hu - base.clean_hu
    assert out.lesion_mask.any()
    assert all(np.sign(les.contrast_hu) == sign for les in out.lesions)
    assert all(les.organ in LESION_ORGANS["abdomen"] for les in out.lesions)
    mean = diff[out.lesion_mask].mean()
    assert sign * mean > 20.0
    # outside the (slightly blurred) lesion edge nothing changes
    far = ~ndimage.binary_dilation(out.lesion_mask, iterations=2)
    assert np.abs(diff[far]).max() == 0.0


def test_insert_lesions_on_arrays():
    ph = make_phantom("abdomen", (48, 48, 48), (1.5, 1.5, 1.5), seed=2, noise_hu=0.0)
    hu, mask, lesions = insert_lesions((ph.clean_hu, ph.labels), 2, seed=1, spacing_kji=(1.5, 1.5, 1.5),
                                       organs=("liver",), kinds=("irregular",), radius_mm=(4.0, 6.0))
    assert hu.dtype == np.float32 and mask.dtype == np.bool_ and hu.shape == mask.shape == ph.labels.shape
    assert mask.any() and np.all(ph.labels[mask] == NAME_TO_LABEL["liver"])
    assert len(lesions) == 2 and all(les.kind == "irregular" and les.organ == "liver" for les in lesions)
    same, none, empty = insert_lesions((ph.clean_hu, ph.labels), 0, seed=1)
    assert np.array_equal(same, ph.clean_hu) and not none.any() and empty == []


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,match", [
    (dict(region="pelvis"), "unknown region"),
    (dict(shape_kji=(64, 64)), "three positive integers"),
    (dict(shape_kji=(64, 0, 64)), "three positive integers"),
    (dict(shape_kji=(64.5, 64, 64)), "three positive integers"),
    (dict(spacing_kji=(1.0, 0.0, 1.0)), "positive"),
    (dict(spacing_kji=(1.0, -2.0, 1.0)), "positive"),
    (dict(spacing_kji=(1.0, 1.0)), "three positive"),
    (dict(ijk_to_ras=np.diag([2.0, 2.0, 2.0, 1.0])), "do not match spacing"),
    (dict(ijk_to_ras=np.eye(3)), "4x4"),
    (dict(fov_fill=0.0), "fov_fill"),
    (dict(seed=-1), "seed"),
    (dict(noise_hu=-1.0), "noise_hu"),
    (dict(lesions=-1), "lesions"),
    (dict(phase="venous"), "contrast phase"),
    (dict(variation="none"), "Variation"),
])
def test_bad_input_raises(kwargs, match):
    args = dict(region="chest", shape_kji=(8, 8, 8), spacing_kji=(1.0, 1.0, 1.0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        make_phantom(**args)


def test_bad_lesion_input_raises():
    ph = make_phantom("head_neck", (16, 16, 16), (4.0, 4.0, 4.0), seed=0)
    with pytest.raises(ValueError, match="sign"):
        insert_lesions(ph, 1, seed=0, sign=2)
    with pytest.raises(ValueError, match="unknown organ"):
        insert_lesions(ph, 1, seed=0, organs=("pineal_gland",))
    with pytest.raises(ValueError, match="none of the organs"):
        insert_lesions(ph, 1, seed=0, organs=("liver",))
    with pytest.raises(ValueError, match="3-D"):
        add_ct_noise(np.zeros((4, 4)), 1.0, seed=0)
