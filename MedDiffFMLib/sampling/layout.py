"""Where the windows of a whole-volume pass go, how they are blended, and their coordinates."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


def axis_coordinates(n: int, padded: int, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    """Normalised coordinates of ``padded`` voxels along an axis whose first ``n`` are the volume."""
    idx = torch.arange(padded, dtype=torch.float32)
    if n == 1:  # a single slice sits in the middle of its range
        return (lo + hi) / 2 + idx * (hi - lo) / 2
    return lo + (hi - lo) * idx / (n - 1)


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Evenly spread window starts covering [0, size) with at least the requested overlap."""
    if size <= window:
        return [0]
    stride = max(1, int(window * (1.0 - overlap)))
    n = math.ceil((size - window) / stride) + 1
    return [int(round(s)) for s in np.linspace(0, size - window, n)]


@dataclass(frozen=True)
class WindowLayout:
    """Windows over a (D, H, W) volume.

    Attributes:
        shape: the volume.
        window: window size per axis (voxels).
        padded: the volume edge-padded so that every axis holds at least one window.
        starts: window start indices per axis; the windows are their Cartesian product.
    """

    shape: tuple[int, int, int]
    window: tuple[int, int, int]
    padded: tuple[int, int, int]
    starts: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]

    @property
    def slices(self) -> list[tuple[slice, slice, slice]]:
        w = self.window
        return [(slice(a, a + w[0]), slice(b, b + w[1]), slice(c, c + w[2]))
                for a in self.starts[0] for b in self.starts[1] for c in self.starts[2]]

    def __len__(self) -> int:
        return len(self.starts[0]) * len(self.starts[1]) * len(self.starts[2])


def make_layout(shape: Sequence[int], window: int, multiple: int, overlap: float) -> WindowLayout:
    """Windows of edge ``window`` over ``shape``.

    Axes shorter than a window get a window of their size rounded up to the U-Net's
    ``multiple`` (at least twice it, so that the coarsest level has more than one voxel for its
    group norms) and are padded (edge values) to it; padding is cropped afterwards.
    """
    shape = tuple(int(s) for s in shape)
    win = tuple(min(window, max(2 * multiple, math.ceil(s / multiple) * multiple)) for s in shape)
    padded = tuple(max(s, w) for s, w in zip(shape, win))
    starts = tuple(tuple(window_starts(p, w, overlap)) for p, w in zip(padded, win))
    return WindowLayout(shape, win, padded, starts)  # type: ignore[arg-type]


def blend_profiles(layout: WindowLayout) -> list[torch.Tensor]:
    """Per axis, the 1-D blending weight of a window: 1 in the middle and a raised-cosine
    ramp (sin^2) over the overlap with the neighbouring window, so that the ramps of
    neighbours sum to one and a voxel's estimate passes smoothly from one window to the next
    across the *whole* overlap; the outermost voxels of a window (where its padding errors
    are) weigh almost nothing wherever a neighbour covers them. Strictly positive, and
    separable so that the weights of the other axes cancel in the normalisation (a truncated
    3-D Gaussian does not: its floor makes the blend a plain average near the volume's faces,
    which shows seams)."""
    profiles = []
    for w, starts in zip(layout.window, layout.starts):
        overlap = min((w - (b - a) for a, b in zip(starts, starts[1:])), default=0)
        ramp = max(1, min(overlap, w // 2))
        up = torch.sin(0.5 * math.pi * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp) ** 2
        p = torch.ones(w, dtype=torch.float64)
        p[:ramp] = up
        p[w - ramp:] = torch.minimum(p[w - ramp:], up.flip(0))
        profiles.append(p)
    return profiles


def blend_weight(layout: WindowLayout) -> torch.Tensor:
    """(wd, wh, ww) float32 blending weight of one window (see :func:`blend_profiles`)."""
    p = blend_profiles(layout)
    return (p[0][:, None, None] * p[1][None, :, None] * p[2][None, None, :]).float()


def inverse_weight_sum(layout: WindowLayout) -> torch.Tensor:
    """(padded) float32 1 / (sum of the blending weights covering each voxel).

    Separable too: the per-axis sums of the shifted profiles multiply. Constant for a layout,
    so it is computed once per pass instead of accumulated at every step."""
    sums = []
    for n, w, starts, prof in zip(layout.padded, layout.window, layout.starts, blend_profiles(layout)):
        s = torch.zeros(n, dtype=torch.float64)
        for a in starts:
            s[a:a + w] += prof
        sums.append(s)
    total = sums[0][:, None, None] * sums[1][None, :, None] * sums[2][None, None, :]
    return (1.0 / total).float()
