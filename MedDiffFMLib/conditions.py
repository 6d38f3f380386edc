"""ControlNet conditions, shared by inference (the tasks) and fine-tuning.

* super-resolution: a thick slice is the mean of the ``factor`` thin slices it covers (a
  slab average: the slice profile of a CT reconstruction to a first approximation). The
  condition is the thick image brought back onto the thin grid along k, plus the factor and
  each thin slice's place within its slab, so that one ControlNet serves factors 2 to 6. Only
  k changes: the in-plane grid is the input's. How the thick image is brought back is part of
  what a ControlNet learnt, so its config names it (``params["interpolation"]``): the
  piecewise-parabolic slab reconstruction for ControlNets trained since it was introduced,
  linear interpolation for older ones (a config without the entry).
* lesion: the lesion mask and the image with the mask blanked (2 channels), as DiffTumor
  conditions its generator.

All arrays are (k, j, i); the slice axis is k.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BLANK_VALUE = 0.0  # model units written into the lesion region of the lesion condition
CONTROL_CHANNELS = {"superres": 3, "lesion": 2}
SUPERRES_FACTORS = (2, 3, 4, 5, 6)
SUPERRES_INTERPOLATIONS = ("linear", "parabolic")
SUPERRES_INTERPOLATION_DEFAULT = "linear"  # what a super-resolution ControlNet config without the entry was trained on
SUPERRES_INTERPOLATION_TRAINED = "parabolic"  # what new super-resolution ControlNets are trained on


def slab_means(x: torch.Tensor | np.ndarray, factor: int):
    """Thick slices: the mean of each run of ``factor`` slices along k (a trailing partial run
    is dropped). (D, H, W) -> (D // factor, H, W), same type as ``x``."""
    f = int(factor)
    n = x.shape[0] // f
    if n == 0:
        raise ValueError(f"{x.shape[0]} slices are fewer than one slab of {f}")
    if isinstance(x, np.ndarray):
        return x[: n * f].reshape(n, f, *x.shape[1:]).mean(axis=1, dtype=np.float64).astype(x.dtype)
    return x[: n * f].reshape(n, f, *x.shape[1:]).mean(dim=1)


def slab_interpolate(thick: torch.Tensor, factor: int) -> torch.Tensor:
    """Linear interpolation along k from thick-slice centres onto the thin grid.

    Thin slice m (of ``len(thick) * factor``) sits at thick index (m + 0.5) / factor - 0.5;
    beyond the first and last thick centres the edge value is kept.

    Args:
        thick: (n, H, W) float tensor.
    Returns:
        (n * factor, H, W) float tensor on the same device.
    """
    f = int(factor)
    n = thick.shape[0]
    pos = (torch.arange(n * f, dtype=torch.float64) + 0.5) / f - 0.5
    pos = pos.clamp(0, n - 1)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    w = (pos - lo).to(thick.dtype).to(thick.device).view(-1, *([1] * (thick.ndim - 1)))
    lo, hi = lo.to(thick.device), hi.to(thick.device)
    return thick[lo] * (1 - w) + thick[hi] * w


def slab_parabolic(thick: torch.Tensor, factor: int) -> torch.Tensor:
    """Thin slices from thick ones by the piecewise-parabolic method (PPM, Colella & Woodward
    1984, the cell-average reconstruction of finite-volume flow solvers), the thin slices being
    the mean of each slab's parabola over their sub-interval.

    A thick slice is a slab average, which is what a finite-volume cell holds, and PPM was made
    to rebuild such averages without smearing jumps: each slab gets the parabola whose mean is
    its value, with edge values from a fourth-order fit limited so that no new extrema appear;
    a slab at a local extremum stays flat. So the slab means are kept exactly (every slab, in
    or out of any window), linear ramps are reproduced exactly, and a step that falls inside
    one slab stays within that slab instead of spreading over two as linear interpolation
    spreads it. The first and last slabs see copies of themselves beyond the edge.

    Args:
        thick: (n, H, W) float tensor, n >= 1.
        factor: thin slices per thick one.
    Returns:
        (n * factor, H, W) float64 tensor on the same device.
    """
    f = int(factor)
    a = thick.double()
    p = torch.cat([a[:1], a[:1], a, a[-1:], a[-1:]])  # two copies beyond each edge
    left, right = p[1:-1] - p[:-2], p[2:] - p[1:-1]  # differences around slabs -1 .. n
    slope = 0.5 * (left + right)  # monotonised central slope: zero at extrema, at most twice a side difference
    slope = torch.where(left * right > 0,
                        torch.sign(slope) * torch.minimum(slope.abs(), 2 * torch.minimum(left.abs(), right.abs())),
                        torch.zeros_like(slope))
    c = p[1:-1]
    edge = 0.5 * (c[:-1] + c[1:]) - (slope[1:] - slope[:-1]) / 6.0  # the n + 1 slab boundaries
    lo, hi = edge[:-1], edge[1:]  # each slab's value at its first and last boundary
    flat = (hi - a) * (a - lo) <= 0
    lo, hi = torch.where(flat, a, lo), torch.where(flat, a, hi)
    span, centre = hi - lo, a - 0.5 * (lo + hi)
    # a parabola overshooting its slab is pulled back so that its extremum sits on an edge
    lo = torch.where(span * centre > span * span / 6, 3 * a - 2 * hi, lo)
    hi = torch.where(-span * span / 6 > span * centre, 3 * a - 2 * lo, hi)
    span, curve = hi - lo, 6.0 * (a - 0.5 * (lo + hi))

    def integral(x: float) -> torch.Tensor:  # of the parabola lo + x (span + curve (1 - x)), from 0 to x
        return lo * x + (span + curve) * x * x / 2 - curve * x ** 3 / 3

    out = torch.empty((a.shape[0] * f, *a.shape[1:]), dtype=torch.float64, device=a.device)
    for s in range(f):
        out[s::f] = (integral((s + 1) / f) - integral(s / f)) * f
    return out


def slab_reconstruct(thick: torch.Tensor, factor: int, interpolation: str) -> torch.Tensor:
    """Thin slices from thick ones by ``interpolation`` ("linear": :func:`slab_interpolate`,
    "parabolic": :func:`slab_parabolic`), in the dtype of ``thick``. (n, H, W) -> (n * factor, H, W)."""
    if interpolation == "linear":
        return slab_interpolate(thick, factor)
    if interpolation == "parabolic":
        return slab_parabolic(thick, factor).to(thick.dtype)
    raise ValueError(f"super-resolution interpolation must be one of {SUPERRES_INTERPOLATIONS}, got {interpolation!r}")


def superres_condition(interp: torch.Tensor, factor: int) -> torch.Tensor:
    """(3, D, H, W) condition from the thin-grid reconstruction ``interp`` (D, H, W) in model
    units (:func:`slab_reconstruct`): the reconstruction, the factor (``log2(f) / log2(6)``, in
    (0, 1]) and the place of each thin slice within its slab (-0.5 first ... +0.5 last)."""
    f = int(factor)
    d = interp.shape[0]
    phase = ((torch.arange(d, dtype=torch.float32) % f) + 0.5) / f - 0.5
    phase = phase.to(interp.device).view(-1, 1, 1).expand_as(interp)
    fac = torch.full_like(interp, math.log2(f) / math.log2(6))
    return torch.stack([interp.float(), fac.float(), phase.float()])


def superres_training_condition(thin: torch.Tensor, factor: int,
                                interpolation: str = SUPERRES_INTERPOLATION_TRAINED) -> torch.Tensor:
    """The condition a thin image (D, H, W) would have after slab averaging by ``factor``;
    slices past the last full slab take the last slab's reconstruction."""
    f = int(factor)
    interp = slab_reconstruct(slab_means(thin.float(), f), f, interpolation)
    if interp.shape[0] < thin.shape[0]:
        extra = interp[-1:].expand(thin.shape[0] - interp.shape[0], *interp.shape[1:])
        interp = torch.cat([interp, extra])
    return superres_condition(interp, f)


def lesion_condition(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(2, D, H, W) condition: lesion mask, and the image with the mask blanked."""
    m = mask.float()
    return torch.stack([m, image * (1 - m) + BLANK_VALUE * m])
