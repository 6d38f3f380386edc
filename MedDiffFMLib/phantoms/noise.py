"""CT noise: spatially correlated Gaussian noise, kept apart from the (noise-free) phantoms."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .fields import _kernel_var
from .params import STREAM_NOISE, check_seed, check_spacing, rng


def add_ct_noise(hu: np.ndarray, noise_hu: float, seed: int, spacing_kji=(1.0, 1.0, 1.0),
                 correlation_mm: float = 0.7) -> np.ndarray:
    """Add spatially correlated Gaussian noise, like the noise in a reconstructed CT image.

    White Gaussian noise is smoothed with a Gaussian of ``correlation_mm`` (per axis, in
    voxels ``correlation_mm / spacing``) and rescaled so its standard deviation is exactly
    ``noise_hu`` in expectation.

    Args:
        hu: (k, j, i) image in HU.
        noise_hu: noise standard deviation in HU; 0 returns a float32 copy.
        seed: noise seed (non-negative int).
        spacing_kji: voxel size in mm along (k, j, i).
        correlation_mm: Gaussian smoothing sigma of the noise, mm (0 = white noise).

    Returns:
        New float32 array of the same shape.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a 3-D (k, j, i) array, got shape {hu.shape}")
    spacing = check_spacing(spacing_kji)
    seed = check_seed(seed)
    if not (math.isfinite(noise_hu) and noise_hu >= 0):
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
    if correlation_mm < 0:
        raise ValueError(f"correlation_mm must be >= 0, got {correlation_mm}")
    out = hu.astype(np.float32, copy=True)
    if noise_hu == 0:
        return out
    noise = rng(seed, STREAM_NOISE).standard_normal(hu.shape, dtype=np.float32)
    sigmas = [correlation_mm / s if correlation_mm > 0 else 0.0 for s in spacing]
    # Sigmas below ~0.3 voxel barely correlate anything; skip them to keep the kernel exact.
    sigmas = [s if s >= 0.3 else 0.0 for s in sigmas]
    if any(sigmas):
        noise = ndimage.gaussian_filter(noise, sigmas, mode="wrap")
        var = np.prod([_kernel_var(s) for s in sigmas])
        noise *= np.float32(1.0 / math.sqrt(var))
    out += np.float32(noise_hu) * noise
    return out

