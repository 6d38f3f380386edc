import numpy as np
import pytest

from MedDiffFMLib.metrics import auroc, dice, psnr, ssim3d


def test_psnr_known_mse():
    target = np.zeros((4, 5, 6), np.float32)
    pred = target + 2.0  # MSE = 4
    assert psnr(pred, target, data_range=100.0) == pytest.approx(10 * np.log10(100.0**2 / 4.0))
    assert psnr(target, target, data_range=1.0) == float("inf")
    mask = np.zeros(target.shape, bool)
    mask[0] = True
    pred2 = target.copy()
    pred2[0] = 1.0  # MSE 1 inside the mask
    assert psnr(pred2, target, 10.0, mask=mask) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="shape"):
        psnr(pred, target[:2], 1.0)
    with pytest.raises(ValueError):
        psnr(pred, target, 0.0)


def test_ssim3d():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(9, 10, 11)).astype(np.float32)
    assert ssim3d(a, a, data_range=8.0) == pytest.approx(1.0)
    noisy = a + rng.normal(size=a.shape).astype(np.float32)
    s = ssim3d(noisy, a, data_range=8.0)
    assert 0.0 < s < 0.9
    mask = np.zeros(a.shape, bool)
    mask[2:7, 2:8, 2:9] = True
    assert ssim3d(a, a, 8.0, mask=mask) == pytest.approx(1.0)
    assert ssim3d(a[:3], a[:3], 8.0) == pytest.approx(1.0)  # thin: smaller window
    with pytest.raises(ValueError, match="too thin"):
        ssim3d(a[:2], a[:2], 8.0)
    with pytest.raises(ValueError, match="3-D"):
        ssim3d(a[0], a[0], 8.0)


def test_auroc():
    labels = np.array([0, 0, 0, 1, 1])
    assert auroc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert auroc([0.9, 0.8, 0.7, 0.2, 0.1], labels) == 0.0
    assert auroc(np.ones(5), labels) == 0.5
    # one tie between a positive and a negative: 5 of 6 pairs right, the tie counts 1/2
    assert auroc([0.1, 0.2, 0.5, 0.5, 0.9], labels) == pytest.approx(5.5 / 6)
    # voxel-level: maps and masks of any shape are flattened
    score = np.zeros((2, 3, 4))
    mask = np.zeros((2, 3, 4), bool)
    mask[1, 1:, 2:] = True
    score[mask] = 1.0
    assert auroc(score, mask) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([np.nan, 0.2], [0, 1])


def test_dice():
    a = np.zeros((3, 4, 5), bool)
    b = np.zeros((3, 4, 5), bool)
    assert dice(a, b) == 1.0
    a[0, :2] = True  # 10 voxels
    assert dice(a, b) == 0.0
    b[0, 1:3] = True  # 10 voxels, 5 shared
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(a.astype(np.uint8) * 7, a) == 1.0
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:1])


# ------------------------------------------------------------------------------ image measures
from MedDiffFMLib import metrics  # noqa: E402


def test_windowed_psnr_clips_both_images_to_the_window():
    truth = np.zeros((8, 8, 8), np.float32)
    pred = truth.copy()
    pred[0, 0, 0] = 5000.0  # clipped to the window top (240 HU)
    expected = 10 * np.log10(360.0 ** 2 / (240.0 ** 2 / truth.size))
    assert metrics.windowed_psnr(pred, truth, (-120.0, 240.0)) == pytest.approx(expected)


def test_rms_difference():
    a = np.zeros((2, 2, 2))
    b = a.copy()
    b[0, 0, 0] = 4.0  # 16 / 8 -> sqrt(2)
    assert metrics.rms_difference(b, a) == pytest.approx(np.sqrt(2.0))
    mask = np.zeros(a.shape, bool)
    mask[1] = True
    assert metrics.rms_difference(b, a, mask) == 0.0


def test_edge_sharpness_ratio():
    # a step along i with 2 mm voxels: the truth's gradient is 50 HU / mm at the two voxels beside it
    truth = np.zeros((4, 4, 8))
    truth[..., 4:] = 200.0
    spacing = (1.0, 1.0, 2.0)
    edges = metrics.edge_mask(truth, spacing)
    assert edges[..., 3:5].all() and edges.sum() == 32
    assert metrics.gradient_magnitude(truth, spacing)[0, 0, 3] == pytest.approx(50.0)
    assert metrics.edge_sharpness_ratio(truth, truth, spacing, edges) == 1.0
    assert metrics.edge_sharpness_ratio(0.5 * truth, truth, spacing, edges) == pytest.approx(0.5)
    from scipy import ndimage

    blurred = ndimage.gaussian_filter1d(truth, 1.5, axis=2)
    assert metrics.edge_sharpness_ratio(blurred, truth, spacing, edges) < 0.8


def test_slab_means_and_slab_mean_error():
    thin = np.arange(6, dtype=np.float64)[:, None, None] * np.ones((6, 2, 2))
    assert metrics.slab_means(thin, 3)[:, 0, 0].tolist() == [1.0, 4.0]
    thick = np.array([1.0, 4.0])[:, None, None] * np.ones((2, 2, 2))
    assert metrics.slab_mean_error(thin, thick, 3) == (0.0, 0.0)
    thick[1, 0, 0] = 6.0  # one slab off by 2
    worst, rms = metrics.slab_mean_error(thin, thick, 3)
    assert worst == 2.0 and rms == pytest.approx(np.sqrt(4.0 / 8))


def test_region_contrast_threshold_dice_and_identity():
    image = np.zeros((10, 10, 10))
    inside = np.zeros(image.shape, bool)
    inside[4:6, 4:6, 4:6] = True
    ring = np.zeros(image.shape, bool)
    ring[2:8, 2:8, 2:8] = True
    ring &= ~inside
    image[inside] = 30.0
    image[ring] = np.where(np.indices(image.shape).sum(0)[ring] % 2, 5.0, -5.0)
    c = metrics.region_contrast(image, inside, ring)
    assert c["contrast"] == pytest.approx(30.0 - image[ring].mean()) and c["std_inside"] == 0.0
    assert c["std_ratio"] == 0.0
    near = ring | inside
    assert metrics.threshold_dice(image, inside, ring, near) == 1.0
    assert metrics.threshold_dice(np.zeros(image.shape), inside, ring, near) == 0.0
    a = np.linspace(-1, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    b = a.copy()
    b[inside] = 9.0
    assert metrics.identical_fraction(b, a, ~inside) == 1.0 and metrics.identical_fraction(b, a, inside) == 0.0
