"""Image-quality and detection metrics: PSNR, 3-D SSIM, AUROC, Dice.

All take numpy arrays (any shape unless stated) and return Python floats. ``ssim3d`` uses
scikit-image (an optional dependency, extra ``benchmark``), imported only when called.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: pred {p.shape} vs target {t.shape}")
    return p, t


def _mask(mask, shape) -> np.ndarray | None:
    if mask is None:
        return None
    m = np.asarray(mask, dtype=bool)
    if m.shape != shape:
        raise ValueError(f"mask shape {m.shape} does not match the images {shape}")
    if not m.any():
        raise ValueError("mask is empty")
    return m


def psnr(pred, target, data_range: float, mask=None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range**2 / MSE)`` (inf when equal).

    ``mask`` (bool, same shape) restricts the MSE to its voxels.
    """
    p, t = _pair(pred, target)
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range!r}")
    m = _mask(mask, p.shape)
    diff = (p - t) if m is None else (p - t)[m]
    mse = float(np.mean(diff * diff))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(float(data_range) ** 2 / mse))


def ssim3d(pred, target, data_range: float, mask=None) -> float:
    """Structural similarity on a 3-D volume (scikit-image ``structural_similarity``).

    Uses scikit-image's defaults (7-voxel uniform window in all three dimensions, K1=0.01,
    K2=0.03); the window shrinks to the largest odd size that fits a thin volume (at least
    3). With ``mask``, the local SSIM map is averaged over the mask voxels instead of the
    whole volume.
    """
    try:
        from skimage.metrics import structural_similarity
    except ImportError as e:  # optional dependency
        raise ImportError(
            "ssim3d needs scikit-image; install it with `pip install scikit-image` "
            "(or the package's 'benchmark' extra)"
        ) from e
    p, t = _pair(pred, target)
    if p.ndim != 3:
        raise ValueError(f"ssim3d expects 3-D volumes, got shape {p.shape}")
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range!r}")
    smallest = min(p.shape)
    win = min(7, smallest if smallest % 2 else smallest - 1)
    if win < 3:
        raise ValueError(f"volume {p.shape} is too thin for SSIM (every dimension needs >= 3 voxels)")
    m = _mask(mask, p.shape)
    if m is None:
        return float(structural_similarity(p, t, data_range=float(data_range), win_size=win))
    _, smap = structural_similarity(p, t, data_range=float(data_range), win_size=win, full=True)
    return float(smap[m].mean())


def auroc(scores, labels) -> float:
    """Area under the ROC curve, rank-based (Mann-Whitney U); ties count one half.

    Arrays of any shape are flattened, so voxel-level (score map vs. lesion mask) and
    volume-level (one score per case) AUROC are the same call. ``labels`` must be bool or
    0/1. Raises ValueError when only one class is present or scores are not finite.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.size}) and labels ({y.size}) differ in size")
    if y.dtype != bool:
        if not np.all((y == 0) | (y == 1)):
            raise ValueError("labels must be bool or 0/1")
        y = y.astype(bool)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC needs both classes; got {n_pos} positive and {n_neg} negative labels"
        )
    ranks = rankdata(s)  # average ranks for ties
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (float(n_pos) * float(n_neg))


def dice(a, b) -> float:
    """Dice overlap of two masks (nonzero = inside); 1.0 when both are empty."""
    x = np.asarray(a).astype(bool, copy=False)
    y = np.asarray(b).astype(bool, copy=False)
    if x.shape != y.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs {y.shape}")
    total = int(x.sum()) + int(y.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(x, y).sum()) / total
