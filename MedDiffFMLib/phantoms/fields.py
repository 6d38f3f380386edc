"""Smooth random fields.

Two kinds, for two needs:

* **Anatomy fields** (:func:`anatomy_field`) decide labels and shapes (deformation, bowel
  loops, gas pockets, vessel trees). They are closed-form functions of a point's position
  in the anatomy frame (random plane waves drawn from a key), so any grid, any sub-box and
  any orientation sees the same continuous field. :func:`field_on_grid` evaluates one on a coarse subset of a grid's
  sample points and interpolates linearly in between (the fields vary over many samples).
* **Texture fields** (:func:`grid_texture`) only add HU variation. They are white noise on
  the sample grid smoothed by a Gaussian that is isotropic in mm (so any orientation gets
  the same statistics), drawn from a seeded generator.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

N_MODES = 24


def field_key(seed: int, stream: int, counter: int) -> tuple[int, int, int]:
    """The key of one anatomy field: it seeds the field's own generator."""
    return seed, stream, counter


def anatomy_field(key, points: np.ndarray, cell: float) -> np.ndarray:
    """A smooth, unit-variance random field at ``points``.

    A sum of :data:`N_MODES` random plane waves with a Gaussian spectrum (random Fourier
    features): its correlation is about ``exp(-r^2 / (2 cell^2))``. It is a closed-form
    function of position, so every grid sees the same field.

    Args:
        key: field key (:func:`field_key`).
        points: (..., 3) positions in a fixed frame (here anatomy-frame units).
        cell: correlation length in the units of ``points``.

    Returns:
        float32 array of shape ``points.shape[:-1]``.
    """
    g = np.random.default_rng(list(key))
    freqs = g.standard_normal((N_MODES, 3)) / cell
    phases = g.uniform(0.0, 2 * math.pi, N_MODES)
    pts = np.asarray(points, np.float32)
    out = np.zeros(pts.shape[:-1], np.float32)
    for w, ph in zip(freqs.astype(np.float32), phases.astype(np.float32)):
        out += np.cos(pts @ w + ph)
    return out * np.float32(math.sqrt(2.0 / N_MODES))


def coarse_indices(start: int, stop: int, step: int) -> np.ndarray:
    """Indices ``start, start + step, ...`` that always include ``stop - 1``."""
    idx = np.arange(start, stop, max(int(step), 1))
    if idx[-1] != stop - 1:
        idx = np.append(idx, stop - 1)
    return idx


def linear_weights(idx: np.ndarray, start: int, stop: int) -> np.ndarray:
    """(stop - start, len(idx)) weights that interpolate values at ``idx`` linearly."""
    x = np.arange(start, stop)
    w = np.zeros((x.size, idx.size), np.float32)
    if idx.size == 1:
        w[:, 0] = 1.0
        return w
    pos = np.clip(np.searchsorted(idx, x, side="right") - 1, 0, idx.size - 2)
    t = (x - idx[pos]) / (idx[pos + 1] - idx[pos])
    rows = np.arange(x.size)
    w[rows, pos] = 1.0 - t
    w[rows, pos + 1] += t
    return w


def upsample(coarse: np.ndarray, wk, wj, wi) -> np.ndarray:
    """Separable linear interpolation: (ck, cj, ci) -> (nk, nj, ni) with per-axis weights
    (``None``: that axis is kept as it is)."""
    tmp = coarse if wk is None else np.tensordot(wk, coarse, axes=(1, 0))  # (nk, cj, ci)
    tmp = tmp if wi is None else np.tensordot(tmp, wi, axes=(2, 1))  # (nk, cj, ni)
    if wj is None:
        return np.ascontiguousarray(tmp)
    nk, cj, ni = tmp.shape
    out = wj @ tmp.transpose(1, 0, 2).reshape(cj, nk * ni)  # (nj, nk * ni)
    return np.ascontiguousarray(out.reshape(wj.shape[0], nk, ni).transpose(1, 0, 2))


def field_on_grid(key: int, coords, cell: float, steps_kji, box) -> np.ndarray:
    """Evaluate a lattice field on a box of a sample grid.

    Args:
        key: field key.
        coords: callable ``(ik, ij, ii) -> (..., 3)`` points for index arrays (an open mesh).
        cell: lattice spacing (units of the points).
        steps_kji: coarse step in samples along (k, j, i).
        box: (k, j, i) slices with explicit bounds.

    Returns:
        float32 field of the box's shape.
    """
    idx = [coarse_indices(s.start, s.stop, st) for s, st in zip(box, steps_kji)]
    pts = coords(*np.ix_(*idx))
    vals = anatomy_field(key, pts, cell)
    w = [None if i.size == s.stop - s.start else linear_weights(i, s.start, s.stop) for i, s in zip(idx, box)]
    return upsample(vals, *w)


def _kernel_var(sigma: float) -> float:
    """Sum of squared weights of scipy's 1-D Gaussian kernel (truncate = 4)."""
    if sigma <= 0:
        return 1.0
    radius = int(4.0 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    w /= w.sum()
    return float(np.sum(w * w))


def grid_texture(generator: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    """Unit-variance Gaussian texture on a grid with correlation ``sigma_vox`` per axis.

    Wide kernels are built on a decimated grid and interpolated back, so the cost does not
    grow with the correlation length. Along an axis whose sigma is below half a sample the
    texture is white there and its amplitude is scaled by ``sqrt(2 sqrt(pi) sigma)``: the
    standard deviation a finer texture keeps after averaging over one sample.

    Args:
        generator: the seeded generator to draw from.
        shape: (k, j, i) grid shape.
        sigma_vox: (k, j, i) Gaussian sigma in samples.

    Returns:
        float32 array of ``shape``.
    """
    steps = [max(1, int(s // 2)) if s >= 4 else 1 for s in sigma_vox]
    cshape = [(n - 1) // st + 2 if st > 1 else n for n, st in zip(shape, steps)]
    noise = generator.standard_normal(cshape, dtype=np.float32)
    sig = [s / st for s, st in zip(sigma_vox, steps)]
    sig = [s if s >= 0.5 else 0.0 for s in sig]
    gain = 1.0
    for s in sigma_vox:
        if s < 0.5:
            gain *= math.sqrt(min(1.0, 2.0 * math.sqrt(math.pi) * max(s, 0.0)))
    if any(sig):
        noise = ndimage.gaussian_filter(noise, sig, mode="wrap")
        noise *= np.float32(gain / math.sqrt(np.prod([_kernel_var(s) for s in sig])))
    elif gain != 1.0:
        noise *= np.float32(gain)
    if any(st > 1 for st in steps):
        w = [linear_weights(np.arange(c) * st, 0, n) if st > 1 else None for c, st, n in zip(cshape, steps, shape)]
        noise = upsample(noise, *w)
    return noise
