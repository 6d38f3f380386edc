"""The held-out phantom family: deterministic, grid-independent, a true slab profile, consistent
labels and lesions, realistic noise, and independent of the training family's code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from MedDiffFMLib import anatomy
from MedDiffFMLib.geometry import make_ijk_to_ras
from MedDiffFMLib.heldout import (LESION_ORGANS, add_ct_noise, evaluate_points, make_heldout_case, plan_phantom,
                                  render_plan, subsample_offsets)
from MedDiffFMLib.heldout.regions import FOCUS_RAS
from MedDiffFMLib.heldout.texture import texture_on_grid

from conftest import rotation_about_axis

SHAPE = (6, 20, 18)


def oblique_grid(region: str, spacing_kji=(2.5, 0.8, 0.7), shape=SHAPE, angle=0.3, centre=None) -> np.ndarray:
    """Oblique, anisotropic, j flipped, centred on the region's focus (or ``centre``, RAS mm)."""
    direction = rotation_about_axis((1.0, -2.0, 0.5), angle) @ np.diag([1.0, -1.0, 1.0])
    m = make_ijk_to_ras(spacing_kji, (0.0, 0.0, 0.0), direction)
    centre = FOCUS_RAS[region] if centre is None else centre
    m[:3, 3] = np.asarray(centre) - m[:3, :3] @ ((np.array(shape[::-1]) - 1) / 2)
    return m


def voxel_ras(m: np.ndarray, k, j, i) -> np.ndarray:
    return m[:3, :3] @ np.array([i, j, k], dtype=np.float64) + m[:3, 3]


@pytest.mark.parametrize("region", ["head_neck", "chest", "abdomen"])
def test_deterministic_by_seed_and_seeds_differ(region):
    m = oblique_grid(region)
    a = make_heldout_case(region, 5, m, SHAPE)
    b = make_heldout_case(region, 5, m, SHAPE)
    c = make_heldout_case(region, 6, m, SHAPE)
    assert np.array_equal(a.clean_hu, b.clean_hu) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.clean_hu, c.clean_hu)
    assert a.clean_hu.dtype == np.float32 and a.labels.dtype == np.uint8 and a.clean_hu.shape == SHAPE
    assert np.all(np.isfinite(a.clean_hu))
    # labels are TotalSegmentator v2 values (255 body); the names say which
    assert set(np.unique(a.labels)) - {0} == set(a.label_names)
    assert all(anatomy.DEFAULT_LABEL_NAMES[v] == n for v, n in a.label_names.items())


def test_labels_at_voxel_centres_follow_the_grid_whatever_its_orientation():
    """The same continuous phantom on an oblique grid: each voxel's label is the phantom's at that
    voxel's RAS centre; a crop of the grid renders exactly the crop; a grid with i reversed
    renders the mirrored array."""
    region = "abdomen"
    plan = plan_phantom(region, 3)
    m = oblique_grid(region)
    full = render_plan(plan, m, SHAPE)
    rng = np.random.default_rng(0)
    idx = [tuple(int(rng.integers(n)) for n in SHAPE) for _ in range(40)]
    points = np.array([voxel_ras(m, *v) for v in idx])
    _, labels = evaluate_points(plan, points)
    assert np.array_equal(labels, [full.labels[v] for v in idx])
    # a crop: origin moved by whole voxels
    crop = m.copy()
    crop[:3, 3] = voxel_ras(m, 1, 3, 2)
    part = render_plan(plan, crop, (4, 12, 10))
    np.testing.assert_allclose(part.clean_hu, full.clean_hu[1:5, 3:15, 2:12], atol=1e-3)
    assert np.array_equal(part.labels, full.labels[1:5, 3:15, 2:12])
    # i reversed: origin at the last column, its direction negated
    mirrored = m.copy()
    mirrored[:3, 0] *= -1
    mirrored[:3, 3] = voxel_ras(m, 0, 0, SHAPE[2] - 1)
    flipped = render_plan(plan, mirrored, SHAPE)
    np.testing.assert_allclose(flipped.clean_hu, full.clean_hu[:, :, ::-1], atol=1e-3)


def test_each_voxel_is_the_mean_of_its_sub_samples():
    region = "chest"
    plan = plan_phantom(region, 4)
    m = oblique_grid(region)
    samples = (5, 1, 1)
    exact = render_plan(plan, m, SHAPE, samples, texture=False, refine_everywhere=True)
    offsets = subsample_offsets(samples)
    kk, jj, ii = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    centres = np.stack([ii, jj, kk], axis=-1).astype(np.float64)
    points = (centres[None] + offsets[:, None, None, None, :]) @ m[:3, :3].T + m[:3, 3]
    hu, _ = evaluate_points(plan, points)
    np.testing.assert_allclose(exact.clean_hu, hu.mean(axis=0), atol=1e-3)
    # the fast path (sub-samples only near edges) gives the same image
    fast = render_plan(plan, m, SHAPE, samples, texture=False)
    assert np.mean(np.abs(fast.clean_hu - exact.clean_hu) < 1e-3) > 0.995
    # texture: the slab mean of the plane waves is exact too
    tex = texture_on_grid(plan.texture, m, SHAPE, offsets)
    np.testing.assert_allclose(tex, plan.texture.at_points(points).mean(axis=0), atol=1e-4)
    assert 0.3 < tex.std() < 2.0


def test_a_thick_slice_is_the_mean_of_the_thin_slices_it_holds():
    region = "abdomen"
    plan = plan_phantom(region, 8)
    thin_m = oblique_grid(region, spacing_kji=(1.0, 0.8, 0.7), shape=(9, 20, 18))
    thick_m = thin_m.copy()
    thick_m[:3, 2] *= 3.0
    thick_m[:3, 3] = voxel_ras(thin_m, 1, 0, 0)  # the thick slice centre is the middle thin one's
    thin = render_plan(plan, thin_m, (9, 20, 18), (3, 1, 1), refine_everywhere=True)
    thick = render_plan(plan, thick_m, (3, 20, 18), (9, 1, 1), refine_everywhere=True)
    np.testing.assert_allclose(thick.clean_hu, thin.clean_hu.reshape(3, 3, 20, 18).mean(axis=1), atol=2e-3)
    assert np.array_equal(thick.labels, thin.labels[1::3])


@pytest.mark.parametrize("region", ["head_neck", "chest", "abdomen"])
def test_lesions_sit_in_their_organs_and_keep_the_anatomy(region):
    centre = (65.0, 5.0, 15.0) if region == "chest" else None  # inside the right lung
    shape = (12, 36, 36)
    m = oblique_grid(region, spacing_kji=(2.0, 1.0, 1.0), shape=shape, centre=centre)
    healthy = make_heldout_case(region, 21, m, shape)
    sick = make_heldout_case(region, 21, m, shape, lesions=2)
    assert not healthy.lesion_mask.any() and sick.lesion_mask.any()
    assert np.array_equal(healthy.labels, sick.labels)  # lesions keep the organ's label
    organ_values = {v for v, n in sick.label_names.items() if n in LESION_ORGANS[region]}
    assert set(np.unique(sick.labels[sick.lesion_mask])) <= organ_values
    changed = np.abs(sick.clean_hu - healthy.clean_hu) > 1.0
    assert changed.any() and changed[sick.lesion_mask].mean() > 0.9
    records = sick.plan.lesions
    assert len(records) == 2 and all(1.5 <= r.radius_mm <= 15.0 for r in records)
    assert {r.organ for r in records} <= set(LESION_ORGANS[region])


def test_ct_noise_level_texture_and_independence_between_slices():
    clean = np.zeros((16, 64, 64), np.float32)
    noisy = add_ct_noise(clean, 20.0, seed=3, spacing_kji=(2.5, 0.7, 0.7))
    assert not clean.any()  # the input is not modified
    assert noisy.std() == pytest.approx(20.0, rel=0.05) and abs(noisy.mean()) < 1.0
    assert np.array_equal(noisy, add_ct_noise(clean, 20.0, seed=3, spacing_kji=(2.5, 0.7, 0.7)))

    def corr(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert abs(corr(noisy[:-1], noisy[1:])) < 0.05  # slices are independent
    assert corr(noisy[:, :, :-1], noisy[:, :, 1:]) > 0.2  # neighbours in-plane are not (no white noise)
    assert corr(noisy[:, :, :-3], noisy[:, :, 3:]) < corr(noisy[:, :, :-1], noisy[:, :, 1:])


def test_independent_of_the_training_family():
    """Nothing the held-out package imports, directly or through the library modules it uses,
    is the training family's code (read from the sources, without importing anything)."""
    import ast

    library = Path(__file__).resolve().parents[1] / "MedDiffFMLib"
    queue, seen = sorted((library / "heldout").glob("*.py")), set()
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        package = path.parent
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                assert not any("phantoms" in a.name for a in node.names), path
            if not isinstance(node, ast.ImportFrom):
                continue
            names = [node.module or ""] + [a.name for a in node.names]
            assert not any("phantoms" in n for n in names), (path, names)
            if node.level:  # a module of the library: follow it
                base = package.parents[node.level - 2] if node.level > 1 else package
                for name in ([node.module] if node.module else [a.name for a in node.names]):
                    target = base.joinpath(*name.split("."))
                    for candidate in (target.with_suffix(".py"), target / "__init__.py"):
                        if candidate.is_file() and library in candidate.parents:
                            queue.append(candidate)
    assert (library / "heldout" / "render.py") in seen and (library / "geometry.py") in seen


def test_bad_arguments_are_refused_before_any_work():
    m = oblique_grid("chest")
    with pytest.raises(ValueError, match="region"):
        plan_phantom("knee", 1)
    with pytest.raises(ValueError, match=">= 0"):
        plan_phantom("chest", -1)
    with pytest.raises(ValueError, match="odd"):
        render_plan(plan_phantom("chest", 1), m, SHAPE, (2, 1, 1))
    with pytest.raises(ValueError, match="shape"):
        render_plan(plan_phantom("chest", 1), m, (0, 4, 4))
