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
