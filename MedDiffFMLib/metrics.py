"""Every measure the benchmark, the demo and the tests use: PSNR, SSIM, AUROC, Dice, edge
sharpness, slab-mean consistency, region contrast.

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


# ------------------------------------------------------------------------------ image measures
def windowed_psnr(pred, target, window: tuple[float, float], mask=None) -> float:
    """PSNR in HU of both images clipped to ``window`` (low, high), data range = its width."""
    lo, hi = (float(w) for w in window)
    p, t = _pair(pred, target)
    return psnr(np.clip(p, lo, hi), np.clip(t, lo, hi), data_range=hi - lo, mask=mask)


def windowed_ssim(pred, target, window: tuple[float, float], mask=None) -> float:
    """:func:`ssim3d` of both images clipped to ``window``, data range = its width."""
    lo, hi = (float(w) for w in window)
    p, t = _pair(pred, target)
    return ssim3d(np.clip(p, lo, hi), np.clip(t, lo, hi), data_range=hi - lo, mask=mask)


def rms_difference(a, b, mask=None) -> float:
    """Root-mean-square of ``a - b`` (over ``mask`` when given), in the images' units."""
    p, t = _pair(a, b)
    m = _mask(mask, p.shape)
    d = (p - t) if m is None else (p - t)[m]
    return float(np.sqrt(np.mean(d * d)))


def gradient_magnitude(image, spacing_kji) -> np.ndarray:
    """|grad| in units per mm (central differences, one-sided at the faces), same shape."""
    x = np.asarray(image, dtype=np.float64)
    parts = np.gradient(x, *[float(s) for s in spacing_kji])
    return np.sqrt(sum(g * g for g in parts))


def edge_mask(truth, spacing_kji, mask=None, quantile: float = 0.9) -> np.ndarray:
    """The truth's edges: voxels whose gradient magnitude is at or above its ``quantile``
    (within ``mask`` when given) and above zero."""
    g = gradient_magnitude(truth, spacing_kji)
    m = _mask(mask, g.shape)
    values = g if m is None else g[m]
    level = float(np.quantile(values, quantile))
    edges = (g >= level) & (g > 0)
    return edges if m is None else edges & m


def edge_sharpness_ratio(output, truth, spacing_kji, edges) -> float:
    """Mean gradient magnitude of ``output`` over the truth's ``edges`` divided by the truth's:
    1 keeps edges as sharp as the truth, < 1 blurs them, > 1 adds noise or ringing there."""
    p, t = _pair(output, truth)
    e = _mask(edges, p.shape)
    return float(gradient_magnitude(p, spacing_kji)[e].mean() / gradient_magnitude(t, spacing_kji)[e].mean())


def slab_means(thin, factor: int) -> np.ndarray:
    """Means of ``factor`` consecutive slices along axis 0 (k); trailing slices dropped."""
    x = np.asarray(thin, dtype=np.float64)
    n = x.shape[0] // int(factor)
    return x[: n * factor].reshape(n, int(factor), *x.shape[1:]).mean(axis=1)


def slab_mean_error(thin, thick, factor: int, mask=None) -> tuple[float, float]:
    """How well thin slices explain thick ones: (max |error|, RMS error) of
    ``slab_means(thin, factor) - thick`` over ``mask`` (on the thick grid) when given."""
    means = slab_means(thin, factor)
    p, t = _pair(means, np.asarray(thick)[: means.shape[0]])
    m = _mask(None if mask is None else np.asarray(mask)[: means.shape[0]], p.shape)
    d = np.abs(p - t) if m is None else np.abs(p - t)[m]
    return float(d.max()), float(np.sqrt(np.mean(d * d)))


# ------------------------------------------------------------------------------ masks and regions
def region_contrast(image, inside, ring) -> dict[str, float]:
    """Mean of ``image`` in ``inside`` minus the mean of ``ring`` (``contrast``), the two
    standard deviations and their ratio (``std_ratio`` = std inside / std ring)."""
    x = np.asarray(image, dtype=np.float64)
    a, r = np.asarray(inside, dtype=bool), np.asarray(ring, dtype=bool)
    if not a.any() or not r.any():
        raise ValueError("region_contrast needs a non-empty region and ring")
    std_in, std_ring = float(x[a].std()), float(x[r].std())
    return {"contrast": float(x[a].mean() - x[r].mean()), "std_inside": std_in, "std_ring": std_ring,
            "std_ratio": std_in / std_ring if std_ring > 0 else float("inf")}


def threshold_dice(image, target, ring, near) -> float:
    """Dice against ``target`` of a threshold segmentation: voxels of ``near`` whose value
    differs from the ``ring`` mean, in the direction of ``target``'s contrast, by more than
    half that contrast (0 when there is no contrast)."""
    x = np.asarray(image, dtype=np.float64)
    target = np.asarray(target, dtype=bool)
    ring_mean = float(x[np.asarray(ring, dtype=bool)].mean())
    contrast = float(x[target].mean()) - ring_mean
    if not np.isfinite(contrast) or contrast == 0.0:
        return dice(np.zeros_like(target), target)
    seg = np.asarray(near, dtype=bool) & (np.sign(contrast) * (x - ring_mean) > abs(contrast) / 2.0)
    return dice(seg, target)


def identical_fraction(a, b, mask) -> float:
    """Fraction of voxels in ``mask`` whose float32 bit patterns are equal in both images."""
    x = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    y = np.ascontiguousarray(b, dtype=np.float32).view(np.uint32)
    m = np.asarray(mask, dtype=bool)
    return 1.0 if not m.any() else float(np.mean(x[m] == y[m]))
