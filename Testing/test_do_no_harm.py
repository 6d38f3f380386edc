"""Do-no-harm rules, on the tiny model (random weights) and oblique, anisotropic grids.

* a voxel a task does not mean to change is unchanged;
* denoising a noise-free image returns it within 1.5 HU RMS, and no voxel moves by more than
  a few noise standard deviations;
* super-resolution keeps the in-plane grid exactly, adds samples along the slice axis only
  (any factor 2-6, one ControlNet), keeps every slab mean within 0.5 HU on any grid, and with
  random weights (the self-check keeps their detail out) is not below linear or cubic
  interpolation;
* every task samples on the input's own grid, at its own voxel size (clamped to the model's
  range): lesion and inpainting content is generated at the input's resolution.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedDiffFMLib import metrics, preprocessing
from MedDiffFMLib.benchmark import baselines
from MedDiffFMLib.conditions import slab_means
from MedDiffFMLib.geometry import direction, make_ijk_to_ras
from MedDiffFMLib.phantoms import make_phantom
from MedDiffFMLib.tasks import TaskRequest, run_task
from MedDiffFMLib.volume import Volume

from conftest import rotation_about_axis

pytestmark = pytest.mark.usefixtures("single_thread")

REGION = "abdomen"
THIN_SPACING = (0.9, 0.8, 0.7)  # (k, j, i) mm: the truth for super-resolution


def oblique(spacing_kji, origin=(-7.5, 30.0, -12.25)) -> np.ndarray:
    return make_ijk_to_ras(spacing_kji, origin, rotation_about_axis((1.0, -2.0, 0.5), 0.7) @ np.diag([1, -1, 1]))


@pytest.fixture
def voxel_sizes_seen(monkeypatch) -> list:
    """The voxel-size condition of every network call, (k, j, i) mm per window."""
    from MedDiffFMLib.networks import FoundationUNet

    seen: list = []
    original = FoundationUNet.forward

    def recording(self, x_t, t, coords, anat, region, spacing, *args, **kwargs):
        seen.extend(tuple(round(float(s), 6) for s in row) for row in spacing)
        return original(self, x_t, t, coords, anat, region, spacing, *args, **kwargs)

    monkeypatch.setattr(FoundationUNet, "forward", recording)
    return seen


@pytest.fixture(scope="module")
def clean_phantom() -> Volume:
    """A noise-free abdomen on an oblique 2.5 x 0.8 x 0.7 mm grid: 24 x 64 x 64 voxels cut from a
    body of clinical size (the phantom scales its body to the field of view, so a small field
    of view would be a miniature with unrealistically sharp detail)."""
    sp = (2.5, 0.8, 0.7)
    ph = make_phantom(REGION, shape_kji=(24, 240, 240), spacing_kji=sp, seed=21, noise_hu=0.0)
    return Volume(np.ascontiguousarray(ph.clean_hu[:, 100:164, 90:154]), oblique(sp))


# ----------------------------------------------------------------------------- denoising
def test_denoising_a_noise_free_image_returns_it(tiny_model_dir, clean_phantom):
    image = Volume(clean_phantom.array.copy(), clean_phantom.ijk_to_ras)
    assert image.array.std() > 30  # anatomy, not a flat image
    res = run_task("denoise", TaskRequest(image=image, region=REGION), tiny_model_dir, device="cpu")
    out = res.volumes["denoised"]
    rms = float(np.sqrt(np.mean((out.array.astype(np.float64) - image.array) ** 2)))
    # this phantom's finest texture (3 HU) passes the finest-detail gate and reads as 3.8 HU of
    # noise (the cap of the total over the finest scale); the change stays a fraction of it
    assert res.scores["noise_level_hu"] < 4.0
    assert rms <= 1.5, rms
    np.testing.assert_array_equal(out.ijk_to_ras, image.ijk_to_ras)


def test_denoising_changes_no_voxel_by_more_than_four_noise_sigmas(tiny_model_dir, clean_phantom):
    rng = np.random.default_rng(3)
    hu = (clean_phantom.array + rng.normal(0, 20.0, clean_phantom.array.shape)).astype(np.float32)
    image = Volume(hu, clean_phantom.ijk_to_ras)
    res = run_task("denoise", TaskRequest(image=image, region=REGION, params={"noise_level": 20.0}), tiny_model_dir,
                   device="cpu")
    change = np.abs(res.volumes["denoised"].array - hu)
    assert change.max() <= 4 * 20.0 + 1e-3
    assert change.max() > 0
    keep = preprocessing.outside_window(hu, REGION)
    assert keep.any() and np.array_equal(res.volumes["denoised"].array[keep], hu[keep])


def test_denoising_samples_at_the_input_voxel_size(tiny_model_dir, clean_phantom, voxel_sizes_seen):
    hu = (clean_phantom.array + np.random.default_rng(4).normal(0, 25.0, clean_phantom.array.shape)).astype(
        np.float32)
    run_task("denoise", TaskRequest(image=Volume(hu, clean_phantom.ijk_to_ras), region=REGION), tiny_model_dir,
             device="cpu")
    assert voxel_sizes_seen and set(voxel_sizes_seen) == {(2.5, 0.8, 0.7)}


# ----------------------------------------------------------------------------- super-resolution
@pytest.fixture(scope="module")
def thin_truth():
    """A noise-free thin-slice phantom (30 x 40 x 36 voxels, 0.9 x 0.8 x 0.7 mm, oblique)."""
    return make_phantom(REGION, shape_kji=(30, 40, 36), spacing_kji=THIN_SPACING, seed=5, noise_hu=0.0,
                        ijk_to_ras=oblique(THIN_SPACING))


def thick_from(truth, factor: int) -> Volume:
    """The thick-slice acquisition of ``truth``: slab means of ``factor`` slices, on the grid whose
    slabs the thin slices subdivide (first corner fixed)."""
    thick = slab_means(truth.clean_hu.astype(np.float64), factor).astype(np.float32)
    sp = truth.spacing_kji
    d = direction(truth.ijk_to_ras)
    first_corner = truth.ijk_to_ras[:3, 3] - d @ (np.asarray(sp)[::-1] / 2)
    new_sp = (sp[0] * factor, sp[1], sp[2])
    origin = first_corner + d @ (np.asarray(new_sp)[::-1] / 2)
    return Volume(thick, make_ijk_to_ras(new_sp, origin, d))


@pytest.mark.parametrize("factor", [2, 3, 5])
def test_superres_keeps_the_in_plane_grid_and_the_slab_means(tiny_model_dir, tiny_controlnet_dirs, thin_truth,
                                                              factor):
    thick = thick_from(thin_truth, factor)
    res = run_task("superres", TaskRequest(image=thick, region=REGION, params={"steps": 2, "factor": factor}),
                   tiny_model_dir, controlnet=tiny_controlnet_dirs["superres"], device="cpu")
    out = res.volumes["superres"]
    n = thick.shape[0]
    assert out.array.shape == (n * factor, *thick.shape[1:])
    # the thin grid is the truth's: same in-plane voxels, direction and first corner
    np.testing.assert_allclose(out.ijk_to_ras, thin_truth.ijk_to_ras[:, :], atol=1e-9)
    # slab means equal the input in every slab (soft tissue, air and bone), to float32 rounding
    lo, hi = preprocessing.window_bounds(REGION)
    inside = (thick.array > lo) & (thick.array < hi)
    assert 0.2 < inside.mean() < 0.95  # this small phantom has soft tissue and air or bone
    err = np.abs(slab_means(out.array.astype(np.float64), factor) - thick.array)
    assert err.max() <= 0.5, err.max()
    assert res.scores["slab_mean_error_hu"] == pytest.approx(float(err.max()), abs=1e-3)
    # not below linear or cubic interpolation of the thick slices, in HU and in windowed PSNR
    truth = thin_truth.clean_hu[: n * factor].astype(np.float64)
    span = hi - lo
    for order in (1, 3):
        classical = baselines.interpolate(thick.array, thick.ijk_to_ras, out.shape, out.ijk_to_ras, order)
        assert metrics.psnr(out.array, truth, data_range=span) >= metrics.psnr(classical, truth, data_range=span)
        assert metrics.windowed_psnr(out.array, truth, (lo, hi)) >= metrics.windowed_psnr(classical, truth, (lo, hi))
    assert 0.0 <= res.scores["model_weight"] <= 1.0


def test_superres_samples_the_thin_grid_at_its_voxel_size(tiny_model_dir, tiny_controlnet_dirs, thin_truth,
                                                          voxel_sizes_seen):
    thick = thick_from(thin_truth, 3)
    run_task("superres", TaskRequest(image=thick, region=REGION, params={"steps": 1, "factor": 3}),
             tiny_model_dir, controlnet=tiny_controlnet_dirs["superres"], device="cpu")
    sizes = set(voxel_sizes_seen)
    assert (0.9, 0.8, 0.7) in sizes  # the output grid
    assert (2.7, 0.8, 0.7) in sizes  # the self-check, one level thicker: the input grid
    assert sizes == {(0.9, 0.8, 0.7), (2.7, 0.8, 0.7)}


def test_superres_with_in_plane_factors_is_refused(tiny_model_dir, tiny_controlnet_dirs, thin_truth):
    thick = thick_from(thin_truth, 2)
    with pytest.raises(ValueError, match="factor"):
        run_task("superres", TaskRequest(image=thick, region=REGION, params={"factor": (2, 2, 1)}),
                 tiny_model_dir, controlnet=tiny_controlnet_dirs["superres"], device="cpu")
    with pytest.raises(ValueError, match="<= 6"):
        run_task("superres", TaskRequest(image=thick, region=REGION, params={"factor": 7}),
                 tiny_model_dir, controlnet=tiny_controlnet_dirs["superres"], device="cpu")


# ----------------------------------------------------------------------------- local tasks
@pytest.mark.parametrize("task", ["lesion", "inpaint"])
def test_local_content_is_generated_at_the_input_resolution(tiny_model_dir, tiny_controlnet_dirs, clean_phantom,
                                                            voxel_sizes_seen, task):
    image = Volume(clean_phantom.array.copy(), clean_phantom.ijk_to_ras)
    mask = np.zeros(image.shape, bool)
    mask[10:14, 28:36, 28:36] = True
    req = TaskRequest(image=image, region=REGION, mask=Volume(mask, image.ijk_to_ras), params={"steps": 2})
    res = run_task(task, req, tiny_model_dir, controlnet=tiny_controlnet_dirs["lesion"], device="cpu")
    out = next(iter(res.volumes.values())).array
    assert out.shape == image.shape
    assert np.array_equal(out[~mask], image.array[~mask])  # bit for bit outside the mask
    assert not np.array_equal(out[mask], image.array[mask])
    assert set(voxel_sizes_seen) == {(2.5, 0.8, 0.7)}


def test_anomaly_refines_at_the_input_voxel_size(tiny_model_dir, clean_phantom, voxel_sizes_seen):
    image = Volume(clean_phantom.array.copy(), clean_phantom.ijk_to_ras)
    res = run_task("anomaly", TaskRequest(image=image, region=REGION, params={"steps": 2}), tiny_model_dir,
                   device="cpu")
    assert res.volumes["anomaly_map"].array.shape == image.shape
    sizes = set(voxel_sizes_seen)
    # a coarse whole-volume pass (one 16^3 window) then the input's own grid
    assert (2.5, 0.8, 0.7) in sizes
    coarse = tuple(round(s * n / 16, 6) for s, n in zip((2.5, 0.8, 0.7), image.shape))
    assert coarse in sizes and len(sizes) == 2
    # outside the intensity window the reconstruction is the input
    keep = preprocessing.outside_window(image.array, REGION)
    assert np.array_equal(res.volumes["reconstruction"].array[keep], image.array[keep])


@pytest.mark.parametrize("noise", ["white", "ramp-filtered"])
def test_noise_estimate_measures_the_total_noise(noise):
    """The blind noise level is the noise's own standard deviation, white or with CT's
    ramp-filtered spectrum (the finest-scale residual alone read 85-90 % of the latter)."""
    from MedDiffFMLib.heldout import add_ct_noise as ramp_filtered_noise
    from MedDiffFMLib.phantoms import add_ct_noise
    from MedDiffFMLib.tasks.denoise import estimate_noise

    sp, noise_hu = (2.5, 0.8, 0.7), 25.0
    k, j, i = np.meshgrid(*(np.arange(n) * s for n, s in zip((24, 64, 64), sp)), indexing="ij")
    organ = (k - 30) ** 2 + (j - 25) ** 2 + (i - 22) ** 2 < 15 ** 2  # mm
    clean = np.where(organ, 120.0, 40.0).astype(np.float32)
    noisy = (add_ct_noise(clean, noise_hu, 3, sp, correlation_mm=0.0) if noise == "white"
             else ramp_filtered_noise(clean, noise_hu, 3, sp))
    lo, hi = preprocessing.window_bounds(REGION)
    estimate_hu = estimate_noise(preprocessing.hu_to_unit(noisy, REGION)) * (hi - lo) / 2
    assert estimate_hu == pytest.approx(noise_hu, rel=0.05)


def test_noise_estimate_of_a_three_slice_image_uses_the_finest_scale():
    """Too thin for the 4-voxel blocks: the finest-scale residual alone (white noise: unbiased)."""
    from MedDiffFMLib.tasks.denoise import estimate_noise

    unit = np.random.default_rng(0).normal(0.0, 0.1, (3, 20, 20))
    assert estimate_noise(unit) == pytest.approx(0.1, rel=0.1)
    with pytest.raises(ValueError, match="too thin"):
        estimate_noise(unit[:2])
