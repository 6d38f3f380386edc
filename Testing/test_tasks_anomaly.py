"""The anomaly task's own rules through ``run_task``: the mask, the body it scores, the
per-tissue z-score and the organ check.

A tiny random foundation model on the ``task_phantom`` fixture (an oblique, anisotropic grid),
and small hand-made volumes: the maps mean nothing, the rules are what is checked.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedDiffFMLib import preprocessing
from MedDiffFMLib.geometry import make_ijk_to_ras
from MedDiffFMLib.tasks import TaskRequest, run_task
from MedDiffFMLib.volume import Volume

from task_requests import request_for

pytestmark = pytest.mark.usefixtures("single_thread")


def test_anomaly_mask_follows_the_map(tiny_model_dir, task_phantom):
    """The mask is the map above the threshold (components below the minimum size dropped):
    a lower threshold flags a superset, and every flagged voxel is above the threshold."""
    masks = {}
    for threshold in (0.5, 2.0):
        # the random model's map, uncapped by the organ check, reaches both thresholds
        req = request_for("anomaly", task_phantom, {"threshold": threshold, "min_size_mm3": 0.0, "organ_check": False})
        res = run_task("anomaly", req, tiny_model_dir, device="cpu")
        amap, mask = res.volumes["anomaly_map"].array, res.segmentations["anomaly"].array
        assert np.all(amap >= 0) and mask.dtype == bool
        # no size filter: exactly the map above the threshold (the map is 0 outside the body)
        assert np.array_equal(mask, amap > threshold) and mask.any()
        assert res.scores["anomalous_volume_ml"] == pytest.approx(mask.sum() * np.prod(req.image.spacing_kji) / 1e3)
        masks[threshold] = mask
    assert masks[2.0].sum() < masks[0.5].sum()
    assert np.all(masks[0.5][masks[2.0]])


def test_anomaly_scores_a_nodule_in_a_lung_cut_by_the_field_of_view(tiny_model_dir):
    """A field of view inside the chest: the lung reaches every edge, so it is no hole of the
    body; the nodule in it is still scored, and voxels the window clips (the lung, in a
    soft-tissue window) are not."""
    from MedDiffFMLib.tasks import anomaly
    from MedDiffFMLib.tasks.common import Models
    from MedDiffFMLib.tasks.registry import TASKS

    rng = np.random.default_rng(0)
    hu = np.full((8, 24, 24), -850.0, np.float32)
    hu[:, :6] = 40.0  # chest wall along one side
    hu[3:6, 14:18, 10:14] = 30.0  # the nodule, well inside the lung
    hu += rng.normal(0, 12, hu.shape).astype(np.float32)
    image = Volume(hu, make_ijk_to_ras((2.0, 0.8, 0.8)))
    params = {k: spec.default for k, spec in TASKS["anomaly"].params.items()}
    models = Models.resolve(TASKS["anomaly"], tiny_model_dir)
    plan = anomaly.prepare(TaskRequest(image=image, region="chest"), params, models)
    nodule = np.zeros(hu.shape, bool)
    nodule[3:6, 14:18, 10:14] = True
    assert plan.body[nodule].all()
    assert not preprocessing.estimate_body_mask(hu)[nodule].any()  # the -500 HU rule would lose it
    # read in a soft-tissue window (an abdominal scan reaching the lung base), the lung is clipped
    res = run_task("anomaly", TaskRequest(image=image, region="abdomen", params={"steps": 1, "reconstructions": 1}),
                   tiny_model_dir, device="cpu")
    amap = res.volumes["anomaly_map"].array
    clipped = preprocessing.outside_window(hu, "abdomen")
    assert clipped.any() and np.all(amap[clipped] == 0) and amap[~clipped].max() > 0


def test_group_zscore_normalises_each_tissue_on_its_own():
    from MedDiffFMLib.tasks.anomaly import group_zscore

    rng = np.random.default_rng(0)
    groups = np.zeros((8, 8, 16), np.int8)
    groups[:, :, :8] = 1
    groups[:, :, 8:] = 2
    # tissue 2 is ten times noisier than tissue 1; an outlier of the same size sits in each
    diff = np.where(groups == 1, 0.01, 0.1) * np.abs(rng.standard_normal(groups.shape)) + 0.1
    diff[4, 4, 3] += 0.2
    diff[4, 4, 12] += 0.2
    z = group_zscore(diff.astype(np.float32), groups, np.ones(groups.shape, bool))
    assert z.min() == 0.0
    # in the quiet tissue the outlier stands out; in the noisy one it is ordinary
    assert z[4, 4, 3] > 10 and z[4, 4, 12] < z[4, 4, 3] / 4
    assert np.median(z[groups == 1]) == pytest.approx(0.0, abs=0.01)  # half the tissue sits at or below its median


def test_anomaly_organ_check_caps_the_map_by_the_organ_deviation(tiny_model_dir, task_phantom):
    """With labels, the map is the model's z-map capped by the z-map of each voxel's deviation from
    its label's median (same seed: the minimum of the uncapped map and that one); without, no change."""
    from MedDiffFMLib.tasks import anomaly, check_params
    from MedDiffFMLib.tasks.common import Models
    from MedDiffFMLib.tasks.registry import TASKS

    maps, recon_hu = {}, None
    for labels in (True, False):
        for check in (True, False):
            req = request_for("anomaly", task_phantom, {"organ_check": check}, anatomy=labels)
            res = run_task("anomaly", req, tiny_model_dir, device="cpu")
            maps[labels, check] = res.volumes["anomaly_map"].array
            recon_hu = res.volumes["reconstruction"].array if labels else recon_hu
    params = check_params("anomaly", request_for("anomaly", task_phantom).params)
    plan = anomaly.prepare(request_for("anomaly", task_phantom), params, Models.resolve(TASKS["anomaly"], tiny_model_dir))
    scored = plan.body & ~preprocessing.outside_window(plan.image.array, plan.region)
    deviation = anomaly.organ_deviation(plan.unit, plan.labels, plan.body, params["smoothing_mm"],
                                        plan.image.spacing_kji)
    organ_z = anomaly.group_zscore(deviation, anomaly.tissue_groups(plan.groups, recon_hu, plan.image.spacing_kji),
                                   scored, params["min_spread_hu"] / preprocessing.hu_per_unit(plan.region))
    np.testing.assert_allclose(maps[True, True], np.minimum(maps[True, False], organ_z), atol=1e-5)
    assert (maps[True, True] < maps[True, False] - 0.1).any() and (maps[True, True] > 0).any()
    np.testing.assert_array_equal(maps[False, True], maps[False, False])


def test_group_zscore_divides_by_at_least_the_minimum_spread():
    from MedDiffFMLib.tasks.anomaly import group_zscore

    rng = np.random.default_rng(1)
    groups = np.ones((6, 6, 6), np.int8)
    diff = (0.001 * np.abs(rng.standard_normal(groups.shape)) + 0.01).astype(np.float32)  # a quiet tissue
    diff[3, 3, 3] = 0.05
    inside = np.ones(groups.shape, bool)
    med = float(np.median(diff))
    assert group_zscore(diff, groups, inside)[3, 3, 3] > 20  # divided by its own tiny spread
    assert group_zscore(diff, groups, inside, min_spread=0.02)[3, 3, 3] == pytest.approx((0.05 - med) / 0.02, rel=1e-5)
    # a spread above the minimum is the tissue's own
    np.testing.assert_array_equal(group_zscore(diff * 100, groups, inside, 0.02), group_zscore(diff * 100, groups, inside))


def test_anomaly_min_spread_only_lowers_the_map(tiny_model_dir, task_phantom):
    maps = {spread: run_task("anomaly", request_for("anomaly", task_phantom, {"min_spread_hu": spread}),
                             tiny_model_dir, device="cpu").volumes["anomaly_map"].array for spread in (0.0, 40.0)}
    assert np.all(maps[40.0] <= maps[0.0] + 1e-6)
    assert (maps[40.0] < maps[0.0] - 0.1).any()


def test_reconstruction_classes_follow_the_smoothed_hu():
    from MedDiffFMLib.tasks.anomaly import RECONSTRUCTION_CLASS_EDGES_HU, reconstruction_classes

    assert RECONSTRUCTION_CLASS_EDGES_HU == tuple(sorted(RECONSTRUCTION_CLASS_EDGES_HU))
    hu = np.zeros((6, 12, 48), np.float32)
    for c, value in enumerate((-100.0, 20.0, 100.0, 300.0)):  # fat, soft tissue, enhanced, contrast
        hu[:, :, 12 * c:12 * (c + 1)] = value
    hu[3, 6, 18] = 400.0  # one bright voxel in the soft tissue: noise, not a class of its own
    classes = reconstruction_classes(hu, (2.5, 0.7, 0.7))
    assert classes.dtype == np.int8
    for c in range(4):
        assert np.all(classes[:, :, 12 * c + 4:12 * c + 8] == c + 1)
    # a Gaussian of 1.5 mm at 0.7 mm voxels spreads the spike below the next edge
    assert classes[3, 6, 18] == 2


def test_anomaly_without_labels_scores_each_class_of_the_reconstruction_on_its_own(tiny_model_dir, task_phantom):
    """Without a label map the z-score groups are the HU classes of the returned reconstruction,
    so that a lesion is scored among the tissue the model put in its place."""
    from scipy import ndimage

    from MedDiffFMLib.tasks import anomaly, check_params
    from MedDiffFMLib.tasks.common import Models
    from MedDiffFMLib.tasks.registry import TASKS

    req = request_for("anomaly", task_phantom, anatomy=False)
    res = run_task("anomaly", req, tiny_model_dir, device="cpu")
    params = check_params("anomaly", req.params)
    plan = anomaly.prepare(req, params, Models.resolve(TASKS["anomaly"], tiny_model_dir))
    assert plan.groups is None
    recon_hu = res.volumes["reconstruction"].array
    keep = preprocessing.outside_window(plan.image.array, plan.region)
    diff = np.where(keep, 0.0, preprocessing.hu_to_unit(recon_hu, plan.region) - plan.unit).astype(np.float32)
    diff = np.abs(ndimage.gaussian_filter(diff, params["smoothing_mm"] / np.asarray(plan.image.spacing_kji)))
    scored = plan.body & ~keep
    min_spread = params["min_spread_hu"] / preprocessing.hu_per_unit(plan.region)
    classes = anomaly.reconstruction_classes(recon_hu, plan.image.spacing_kji)
    edges = anomaly.reconstruction_edges(recon_hu, plan.image.spacing_kji)
    tissue = classes + 4 * edges.astype(np.int16)
    np.testing.assert_array_equal(anomaly.tissue_groups(None, recon_hu, plan.image.spacing_kji), tissue)
    assert len(np.unique(classes[scored])) >= 2  # the phantom holds more than one tissue class
    expected = anomaly.group_zscore(diff, tissue, scored, min_spread)
    np.testing.assert_allclose(res.volumes["anomaly_map"].array, expected, atol=1e-3)
    one_group = anomaly.group_zscore(diff, np.ones(classes.shape, np.int8), scored, min_spread)
    assert np.abs(expected - one_group).max() > 0.1


def test_tissue_groups_split_each_anatomy_group_by_reconstruction_class():
    """With a group map, one z-score group per (anatomy group, HU class) pair present; without one,
    one per (HU class, edge or not) pair."""
    from MedDiffFMLib.tasks.anomaly import reconstruction_classes, reconstruction_edges, tissue_groups

    groups = np.zeros((4, 10, 40), np.int8)
    groups[:, :, 20:] = 14  # the largest group value
    hu = np.zeros(groups.shape, np.float32)
    hu[:, :, 10:30] = 300.0  # each group holds soft tissue and a contrast-filled part
    spacing = (3.0, 0.8, 0.8)
    classes, edges = reconstruction_classes(hu, spacing), reconstruction_edges(hu, spacing)
    assert edges[:, :, 9:11].all() and edges[:, :, 29:31].all() and not edges[:, :, 20].any()
    for split, tissue, n in (((groups, classes), tissue_groups(groups, hu, spacing), 4),
                             ((classes, edges), tissue_groups(None, hu, spacing), 4)):
        keys = {tuple(int(a[v]) for a in split) for v in np.ndindex(groups.shape)}
        # the pairs, plus the intermediate class the smoothing makes at each step of 300 HU
        assert len(keys) >= n and len(np.unique(tissue)) == len(keys)
        for key in keys:  # equal tissue value <=> equal pair
            sel = np.logical_and.reduce([a == k for a, k in zip(split, key)])
            assert len(np.unique(tissue[sel])) == 1 and not np.isin(tissue[~sel], np.unique(tissue[sel])).any()


def test_reconstruction_edges_are_steep_gradients_in_hu_per_mm():
    """An edge is a gradient above EDGE_GRADIENT_HU_PER_MM in physical units: a ramp just under it
    is no edge whatever the voxel size, a step is one near the step only, along slices as in-plane."""
    from MedDiffFMLib.tasks.anomaly import EDGE_GRADIENT_HU_PER_MM, reconstruction_edges

    for slope, is_edge in ((0.8 * EDGE_GRADIENT_HU_PER_MM, False), (1.5 * EDGE_GRADIENT_HU_PER_MM, True)):
        across_i = np.broadcast_to(slope * 0.7 * np.arange(60), (12, 8, 60)).astype(np.float32)
        across_k = np.broadcast_to(slope * 3.0 * np.arange(12)[:, None, None], (12, 8, 60)).astype(np.float32)
        for ramp in (across_i, across_k):
            assert reconstruction_edges(ramp, (3.0, 0.7, 0.7))[6, 4, 30] == is_edge
    step = np.zeros((6, 8, 60), np.float32)
    step[:, :, 30:] = 100.0
    edges = reconstruction_edges(step, (3.0, 0.7, 0.7))
    assert edges[:, :, 29:31].all() and not edges[:, :, :20].any() and not edges[:, :, 40:].any()
    # the same step across thick slices: an edge on the two slices beside it, none two slices away
    slab = np.zeros((12, 8, 8), np.float32)
    slab[6:] = 100.0
    edges = reconstruction_edges(slab, (3.0, 0.7, 0.7))
    assert edges[5:7].all() and not edges[:4].any() and not edges[8:].any()


def test_ball_holds_the_offsets_within_its_radius_in_mm():
    from MedDiffFMLib.tasks.anomaly import ball

    iso = ball(2.0, (1.0, 1.0, 1.0))
    # the integer points within 2 of the origin: 1 + 6 (at 1) + 12 (at sqrt 2) + 8 (at sqrt 3) + 6 (at 2)
    assert iso.shape == (5, 5, 5) and iso.sum() == 33 and iso[0, 2, 2] and not iso[0, 1, 2]
    # thick slices: no extent across them; in-plane 0.7 mm voxels reach 2 voxels (1.4 mm), the corner
    # (1.98 mm) inside, 3 voxels (2.1 mm) outside
    flat = ball(2.0, (3.0, 0.7, 0.7))
    assert flat.shape == (1, 5, 5) and flat[0, 0, 0] and flat.all()
    assert ball(2.0, (1.5, 0.7, 0.7)).shape == (3, 5, 5)


def test_anomaly_mask_opening_drops_thin_parts_and_keeps_blobs():
    """Opened by a 2 mm ball, a sheet two voxels thick goes and a ball of radius 5 mm stays but for
    its caps (its first and last slices are narrower than the opening's ball), on a grid of 0.7 mm
    voxels and 2 mm slices."""
    from MedDiffFMLib.tasks.anomaly import anomaly_mask, ball

    spacing = (2.0, 0.7, 0.7)
    k, j, i = np.meshgrid(*(np.arange(n) * s for n, s in zip((16, 40, 40), spacing)), indexing="ij")
    blob = (k - 16.0) ** 2 + (j - 14.0) ** 2 + (i - 14.0) ** 2 <= 5.0 ** 2
    sheet = (j >= 21.0) & (j < 22.4)  # two voxels thick, across the whole field
    amap = np.where(blob | sheet, 6.0, 0.0).astype(np.float32)
    body = np.ones(amap.shape, bool)
    plain = anomaly_mask(amap, body, 4.0, 1)
    opened = anomaly_mask(amap, body, 4.0, 1, ball(2.0, spacing))
    assert np.array_equal(plain, blob | sheet)
    assert not (opened & sheet & ~blob).any() and opened[blob].mean() > 0.9 and not (opened & ~blob).any()


def test_anomaly_opens_the_mask_without_labels_only(tiny_model_dir, task_phantom):
    """Without a label map the task's mask is its unopened mask opened by a ball of ``opening_mm``
    (by default too); with one, ``opening_mm`` changes nothing."""
    from scipy import ndimage

    from MedDiffFMLib.tasks.anomaly import ball
    from MedDiffFMLib.tasks.registry import TASKS

    default = TASKS["anomaly"].params["opening_mm"].default
    masks = {}
    for labels in (False, True):
        for opening in (0.0, None):
            params = {"threshold": 0.5, "min_size_mm3": 0.0, "organ_check": False}
            req = request_for("anomaly", task_phantom, params if opening is None else {**params, "opening_mm": opening},
                              anatomy=labels)
            masks[labels, opening] = run_task("anomaly", req, tiny_model_dir, device="cpu").segmentations["anomaly"].array
    spacing = request_for("anomaly", task_phantom).image.spacing_kji
    expected = ndimage.binary_opening(masks[False, 0.0], ball(default, spacing))
    assert np.array_equal(masks[False, None], expected) and masks[False, None].sum() < masks[False, 0.0].sum()
    assert np.array_equal(masks[True, None], masks[True, 0.0])
