"""Tissue texture: a sum of random plane waves at several scales, evaluated exactly.

A plane wave ``cos(w . x + phase)`` sampled on an affine grid factorises over the three
index axes, so the field is built from three 1-D complex exponentials per wave (no per-voxel
trigonometry), and its mean over a voxel's sub-samples (the slab profile) is the centre value
times ``mean_s cos(w . offset_s)``: exact, at the cost of one evaluation per voxel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# (shortest wavelength mm, longest wavelength mm, waves, weight): grain, mottle, shading
TEXTURE_BANDS: tuple[tuple[float, float, int, float], ...] = ((1.8, 4.0, 12, 0.45), (5.0, 12.0, 12, 0.6),
                                                             (15.0, 40.0, 8, 0.65))


@dataclass
class Texture:
    """Unit-variance random field ``sum_m amplitude_m cos(wavevector_m . x + phase_m)`` (x in RAS mm)."""

    wavevectors: np.ndarray  # (M, 3) rad / mm
    phases: np.ndarray  # (M,)
    amplitudes: np.ndarray  # (M,)

    def at_points(self, points: np.ndarray) -> np.ndarray:
        """The field at (..., 3) RAS points (direct sum; for checks and small inputs)."""
        out = np.zeros(points.shape[:-1], dtype=np.float64)
        for w, phase, a in zip(self.wavevectors, self.phases, self.amplitudes):
            out += a * np.cos(points.astype(np.float64) @ w + phase)
        return out


def draw_texture(rng: np.random.Generator,
                 bands: Sequence[tuple[float, float, int, float]] = TEXTURE_BANDS) -> Texture:
    """Random directions (uniform on the sphere), log-uniform wavelengths within each band,
    uniform phases; amplitudes so that the whole field has unit variance."""
    wavevectors, phases, amplitudes = [], [], []
    total_weight = float(np.sqrt(sum(weight ** 2 for *_, weight in bands)))
    for shortest, longest, waves, weight in bands:
        direction = rng.standard_normal((waves, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = np.exp(rng.uniform(np.log(shortest), np.log(longest), waves))
        wavevectors.append(direction * (2 * np.pi / wavelength)[:, None])
        phases.append(rng.uniform(0, 2 * np.pi, waves))
        amplitudes.append(np.full(waves, weight / total_weight * np.sqrt(2.0 / waves)))
    return Texture(np.concatenate(wavevectors), np.concatenate(phases), np.concatenate(amplitudes))


def texture_on_grid(texture: Texture, ijk_to_ras: np.ndarray, shape_kji: Sequence[int],
                    offsets_ijk: np.ndarray, k_range: tuple[int, int] | None = None) -> np.ndarray:
    """The mean of the field over each voxel's sub-samples, (k, j, i) float32.

    Args:
        offsets_ijk: (S, 3) sub-sample offsets in index units (i, j, k), symmetric about 0.
        k_range: only slices ``k_range[0] <= k < k_range[1]`` (default all).
    """
    m = np.asarray(ijk_to_ras, dtype=np.float64)
    k0, k1 = k_range if k_range is not None else (0, int(shape_kji[0]))
    nk, nj, ni = k1 - k0, int(shape_kji[1]), int(shape_kji[2])
    out = np.zeros((nk, nj, ni), dtype=np.float32)
    idx_i, idx_j, idx_k = np.arange(ni), np.arange(nj), np.arange(k0, k1)
    for w, phase, a in zip(texture.wavevectors, texture.phases, texture.amplitudes):
        step = m[:3, :3].T @ w  # phase change per index step along i, j, k
        slab = float(np.mean(np.cos(offsets_ijk @ step)))  # exact sub-sample mean (symmetric offsets)
        start = np.exp(1j * (float(w @ m[:3, 3]) + phase)) * a * slab
        ek = (start * np.exp(1j * step[2] * idx_k)).astype(np.complex64)
        ej = np.exp(1j * step[1] * idx_j).astype(np.complex64)
        ei = np.exp(1j * step[0] * idx_i).astype(np.complex64)
        out += ((ek[:, None] * ej[None, :])[:, :, None] * ei[None, None, :]).real
    return out
