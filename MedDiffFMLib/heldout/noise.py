"""CT-like noise for the held-out family: filtered back-projection texture, slice by slice.

Reconstructed CT noise is correlated within a slice with a noise power spectrum shaped like
a ramp times the reconstruction kernel's apodisation (low at zero frequency, a peak at mid
frequencies, falling to the cut-off), and nearly independent between slices. The training
phantoms use isotropic Gaussian-correlated noise instead; this is deliberately different.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Gaussian apodisation of the ramp: NPS(f) = f exp(-(f / f0)^2) peaks at f0 / sqrt(2)
APODISATION_CYCLES_PER_MM = 0.45


def ct_noise(shape_kji: Sequence[int], spacing_kji: Sequence[float], noise_hu: float, seed: int,
             apodisation_cycles_per_mm: float = APODISATION_CYCLES_PER_MM) -> np.ndarray:
    """Zero-mean noise of standard deviation ``noise_hu`` (in expectation), (k, j, i) float32.

    In-plane (j, i) it has the ramp x Gaussian power spectrum in cycles / mm of the grid's own
    in-plane spacing; slices (k) are independent.
    """
    if not (np.isfinite(noise_hu) and noise_hu >= 0):
        raise ValueError(f"noise_hu must be >= 0, got {noise_hu}")
    nk, nj, ni = (int(s) for s in shape_kji)
    _, sj, si = (float(s) for s in spacing_kji)
    if noise_hu == 0:
        return np.zeros((nk, nj, ni), np.float32)
    fj = np.fft.fftfreq(nj, d=sj)[:, None]
    fi = np.fft.rfftfreq(ni, d=si)[None, :]
    radial = np.sqrt(fj ** 2 + fi ** 2)
    amplitude = np.sqrt(radial * np.exp(-((radial / apodisation_cycles_per_mm) ** 2)))
    # variance of the filtered unit white noise (orthonormal FFT): mean |H|^2 over the full plane
    weight = np.full(amplitude.shape, 2.0)
    weight[:, 0] = 1.0
    if ni % 2 == 0:
        weight[:, -1] = 1.0
    variance = float(np.sum(weight * amplitude ** 2) / (nj * ni))
    amplitude = amplitude / np.sqrt(max(variance, 1e-30))
    white = np.random.default_rng([int(seed), 31]).standard_normal((nk, nj, ni))
    coloured = np.fft.irfft2(np.fft.rfft2(white, norm="ortho") * amplitude, s=(nj, ni), norm="ortho")
    return (noise_hu * coloured).astype(np.float32)


def add_ct_noise(clean_hu: np.ndarray, noise_hu: float, seed: int, spacing_kji: Sequence[float]) -> np.ndarray:
    """``clean_hu + ct_noise(...)`` as a new float32 array (the input is not modified)."""
    clean_hu = np.asarray(clean_hu)
    if clean_hu.ndim != 3:
        raise ValueError(f"clean_hu must be a 3-D (k, j, i) array, got shape {clean_hu.shape}")
    return (clean_hu.astype(np.float32) + ct_noise(clean_hu.shape, spacing_kji, noise_hu, seed)).astype(np.float32)
