"""Whole-volume, patch-wise sampling.

At every reverse step the noise is estimated on overlapping windows that cover the whole
volume, the window estimates are blended with a tapered weight (:func:`blend_weight`, so no
seam shows at window borders), and then the *whole volume* takes one scheduler step. Each
window knows where it sits through the normalised coordinates of its voxels within the whole
volume.

Also here: the image-level path (the whole volume resized to one window) and multi-level
synthesis (image level first, then native-resolution refinement).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import anatomy
from .diffusion import NoiseSchedule, step
from .networks import NULL_REGION, NoisePredictor
from .progress import Cancelled, Progress

ProgressCallback = Callable[[Progress], None]


@dataclass
class SamplerOptions:
    """How to sample.

    Attributes:
        steps: number of reverse steps (any count up to T).
        method: "ddim" (deterministic unless eta > 0) or "ddpm" (ancestral, eta = 1).
        eta: override the stochasticity of the step (0 = DDIM, 1 = DDPM).
        guidance_scale: classifier-free guidance; 1 disables it (one network call per window).
        window: window edge in voxels (default: the model's); rounded to the U-Net's multiple.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per network call: the memory bound.
        seed: seeds all noise; the same seed gives the same result on the same device.
        precision: "fp32", "bf16" or "fp16" (autocast; reduced precision only on CUDA).
        clip_x0: clip the clean estimate to [-1, 1] at every step.
    """

    steps: int = 50
    method: str = "ddim"
    eta: Optional[float] = None
    guidance_scale: float = 1.0
    window: Optional[int] = None
    overlap: float = 0.25
    batch_size: int = 4
    seed: int = 0
    precision: str = "fp32"
    clip_x0: bool = True

    def __post_init__(self) -> None:
        if self.method not in ("ddim", "ddpm"):
            raise ValueError(f"method must be 'ddim' or 'ddpm', got {self.method!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.steps < 1:
            raise ValueError("steps must be >= 1")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")

    @property
    def step_eta(self) -> float:
        if self.eta is not None:
            return float(self.eta)
        return 1.0 if self.method == "ddpm" else 0.0


@dataclass
class Condition:
    """Conditions for one volume, on the sampling grid (D, H, W).

    Attributes:
        region: region index (networks.REGION_INDEX), 0 = unconditional.
        anatomy: None; an integer group map (D, H, W) (anatomy.group_map); or soft anatomy
            channels (A, D, H, W) (used at image level, after resizing one-hot channels).
        control: ControlNet condition (C, D, H, W), or None.
        coord_range: per axis (k, j, i) the normalised coordinates of the first and last voxel;
            default (-1, 1): this grid *is* the whole volume.
    """

    region: int = NULL_REGION
    anatomy: Optional[torch.Tensor] = None
    control: Optional[torch.Tensor] = None
    coord_range: Optional[Sequence[tuple[float, float]]] = None

    def ranges(self) -> list[tuple[float, float]]:
        return list(self.coord_range) if self.coord_range is not None else [(-1.0, 1.0)] * 3


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


def blend_weight(win: Sequence[int], slices: Sequence[tuple[slice, ...]]) -> torch.Tensor:
    """Blending weight of one window of size ``win`` in the layout ``slices``.

    Separable: per axis, 1 in the middle and a raised-cosine ramp (sin^2) over the overlap
    with the neighbouring window, so that the ramps of neighbours sum to one and a voxel's
    estimate passes smoothly from one window to the next across the *whole* overlap; the
    outermost voxels of a window (where its padding errors are) weigh almost nothing wherever
    a neighbour covers them. Strictly positive everywhere, and separable so that the weights
    of the other axes cancel in the normalisation (a truncated 3-D Gaussian does not: its
    floor value makes the blend a plain average near the volume's faces, which shows seams).
    """
    profiles = []
    for axis, w in enumerate(win):
        starts = sorted({sl[axis].start for sl in slices})
        overlap = min((w - (b - a) for a, b in zip(starts, starts[1:])), default=0)
        ramp = max(1, min(overlap, w // 2))
        up = torch.sin(0.5 * math.pi * (torch.arange(ramp, dtype=torch.float64) + 0.5) / ramp) ** 2
        p = torch.ones(w, dtype=torch.float64)
        p[:ramp] = up
        p[w - ramp:] = torch.minimum(p[w - ramp:], up.flip(0))
        profiles.append(p)
    weight = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return weight.float()


class PatchSampler:
    """Runs a :class:`NoisePredictor` over whole volumes, one blended estimate per step."""

    def __init__(self, predictor: NoisePredictor, options: Optional[SamplerOptions] = None,
                 device: str | torch.device = "cpu"):
        self.predictor = predictor.eval()
        self.options = options or SamplerOptions()
        self.device = torch.device(device)
        self.cfg = predictor.cfg
        self.schedule = NoiseSchedule(self.cfg)
        w = self.options.window or self.cfg.window
        m = self.cfg.downsampling
        self.window = max(m, (int(w) // m) * m)

    # ----------------------------------------------------------------- layout
    def layout(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], list[tuple[slice, ...]]]:
        """Window size, padded shape and window slices for a volume of ``shape`` (D, H, W).

        Axes shorter than a window get a window of their size rounded up to the U-Net's
        multiple (at least twice that multiple, so that the coarsest level has more than one
        voxel for its group norms) and are padded (edge values) to it; padding is cropped
        afterwards.
        """
        m = self.cfg.downsampling
        win = tuple(min(self.window, max(2 * m, math.ceil(s / m) * m)) for s in shape)
        padded = tuple(max(s, w) for s, w in zip(shape, win))
        starts = [window_starts(p, w, self.options.overlap) for p, w in zip(padded, win)]
        slices = [
            (slice(a, a + win[0]), slice(b, b + win[1]), slice(c, c + win[2]))
            for a in starts[0] for b in starts[1] for c in starts[2]
        ]
        return win, padded, slices

    def _autocast(self):
        if self.device.type == "cuda" and self.options.precision != "fp32":
            dtype = torch.bfloat16 if self.options.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast("cpu", enabled=False)

    def _window_batch(self, x, coords_axes, cond, sls, guidance: bool):
        """Network inputs for a batch of windows (padded volume tensors in, batched tensors out)."""
        xs = torch.stack([x[sl] for sl in sls]).unsqueeze(1)
        coords = torch.stack([
            torch.stack(torch.meshgrid(coords_axes[0][sl[0]], coords_axes[1][sl[1]], coords_axes[2][sl[2]],
                                       indexing="ij"))
            for sl in sls
        ])
        if cond.anatomy is None:
            anat = anatomy.group_channels(None, (len(sls), *xs.shape[2:]))
        elif cond.anatomy.ndim == 3:
            anat = anatomy.group_channels(torch.stack([cond.anatomy[sl] for sl in sls]))
        else:
            anat = torch.stack([cond.anatomy[(slice(None), *sl)] for sl in sls]).float()
        region = torch.full((len(sls),), int(cond.region), dtype=torch.long)
        control = None
        if cond.control is not None:
            control = torch.stack([cond.control[(slice(None), *sl)] for sl in sls]).float()
        t_dev = lambda a: a.to(self.device) if a is not None else None  # noqa: E731
        xs, coords, anat, region, control = map(t_dev, (xs, coords, anat, region, control))
        if guidance:
            xs = torch.cat([xs, xs])
            coords = torch.cat([coords, coords])
            anat = torch.cat([anat, torch.zeros_like(anat)])
            region = torch.cat([region, torch.full_like(region, NULL_REGION)])
            control = torch.cat([control, control]) if control is not None else None
        return xs, coords, anat, region, control

    def _pad(self, t: torch.Tensor, padded: Sequence[int]) -> torch.Tensor:
        """Edge-pad the last three dims of ``t`` up to ``padded``."""
        pads = [p - s for p, s in zip(padded, t.shape[-3:])]
        if not any(pads):
            return t
        spec = [0, pads[2], 0, pads[1], 0, pads[0]]
        lead = t.shape[:-3]
        flat = t.reshape(-1, 1, *t.shape[-3:]).float()
        out = F.pad(flat, spec, mode="replicate")
        return out.reshape(*lead, *out.shape[-3:]).to(t.dtype)

    @torch.no_grad()
    def predict_eps(self, x_t: torch.Tensor, t: int, cond: Condition,
                    on_window: Optional[Callable[[int, int], None]] = None,
                    cancel: Optional[Callable[[], bool]] = None) -> torch.Tensor:
        """Blended noise estimate for the whole volume.

        Args:
            x_t: (D, H, W) float32 noisy volume on the CPU, model units.
            t: the timestep.
            cond: conditions on the same grid.
            on_window: called with (windows done, windows total) after every batch.
            cancel: polled between batches; when it returns True, :class:`Cancelled` is raised.

        Returns:
            (D, H, W) float32 epsilon on the CPU.
        """
        shape = tuple(x_t.shape)
        win, padded, slices = self.layout(shape)
        x = self._pad(x_t.float(), padded)
        anat = self._pad(cond.anatomy, padded) if cond.anatomy is not None else None
        control = self._pad(cond.control, padded) if cond.control is not None else None
        padded_cond = Condition(cond.region, anat, control, cond.coord_range)
        coords_axes = [axis_coordinates(n, p, lo, hi) for n, p, (lo, hi) in zip(shape, padded, cond.ranges())]
        guidance = self.options.guidance_scale != 1.0
        single = len(slices) == 1
        if not single:
            weight = blend_weight(win, slices)
            acc = torch.zeros(padded)
            wsum = torch.zeros(padded)
        bs = self.options.batch_size
        for start in range(0, len(slices), bs):
            if cancel is not None and cancel():
                raise Cancelled("cancelled")
            sls = slices[start:start + bs]
            xs, coords, anat_b, region, control_b = self._window_batch(x, coords_axes, padded_cond, sls, guidance)
            tt = torch.full((xs.shape[0],), int(t), dtype=torch.long, device=self.device)
            with self._autocast():
                eps = self.predictor(xs, tt, coords, anat_b, region, control_b).float()
            if guidance:
                cond_eps, null_eps = eps.chunk(2)
                eps = null_eps + self.options.guidance_scale * (cond_eps - null_eps)
            eps = eps[:, 0].cpu()
            if single:
                acc = eps[0]
            else:
                for e, sl in zip(eps, sls):
                    acc[sl] += e * weight
                    wsum[sl] += weight
            if on_window is not None:
                on_window(min(start + bs, len(slices)), len(slices))
        out = acc if single else acc / wsum
        return out[: shape[0], : shape[1], : shape[2]].contiguous()

    # --------------------------------------------------------------- sampling
    def generator(self, offset: int = 0) -> torch.Generator:
        """CPU generator: the same seed gives the same noise on every device."""
        return torch.Generator().manual_seed(int(self.options.seed) + int(offset))

    def noise_like(self, shape: Sequence[int], gen: torch.Generator) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=gen)

    def sample(
        self,
        shape: Sequence[int],
        cond: Condition,
        x_init: Optional[torch.Tensor] = None,
        t_start: Optional[int] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[Callable[[], bool]] = None,
        stage: str = "sampling",
    ) -> torch.Tensor:
        """Run the reverse process over a whole volume.

        Args:
            shape: (D, H, W).
            cond: conditions on that grid.
            x_init: optional clean image (D, H, W) in model units: it is noised to ``t_start``
                and sampling starts there (partial diffusion, SDEdit-style).
            t_start: first timestep (default T - 1).

        Returns:
            (D, H, W) float32 sample in model units on the CPU.
        """
        gen = self.generator()
        ts = self.schedule.timesteps(self.options.steps, t_start)
        if x_init is not None:
            if tuple(x_init.shape) != tuple(shape):
                raise ValueError(f"x_init shape {tuple(x_init.shape)} != {tuple(shape)}")
            noise = self.noise_like(shape, gen)
            x = self.schedule.add_noise(x_init.float().unsqueeze(0), noise.unsqueeze(0),
                                        torch.tensor([ts[0]]))[0]
        else:
            x = self.noise_like(shape, gen)
        return self.run_chain(x, ts, cond, gen, progress, cancel, stage)

    def run_chain(self, x, ts, cond, gen, progress=None, cancel=None, stage="sampling", on_x0=None):
        """Reverse steps along ``ts`` from x at ts[0]. ``on_x0(t, x0)`` may replace the clean estimate."""
        tracker = ProgressTracker(progress, len(ts), stage)
        for i, t in enumerate(ts):
            t_prev = ts[i + 1] if i + 1 < len(ts) else -1
            eps = self.predict_eps(x, t, cond, on_window=lambda d, n: tracker.window(i, d, n), cancel=cancel)
            x0 = None
            if on_x0 is not None:
                x0 = on_x0(t, self._x0(x, eps, t))
            x, _ = step(self.schedule, x, eps, t, t_prev, self.options.step_eta, gen, self.options.clip_x0, x0=x0)
        return x

    def _x0(self, x, eps, t):
        a = self.schedule.alpha_bar(t)
        x0 = (x - (1 - a) ** 0.5 * eps) / a ** 0.5
        return x0.clamp(-1, 1) if self.options.clip_x0 else x0

    # ------------------------------------------------------- image level paths
    def sample_image_level(self, shape: Sequence[int], cond: Condition, progress=None, cancel=None,
                           stage: str = "image level") -> torch.Tensor:
        """Sample the whole volume at window size (one window), then resize it to ``shape``."""
        win = (self.window,) * 3
        small = resize_condition(cond, shape, win)
        # a volume of exactly one window is sampled as that single window
        x = self.sample(win, small, progress=progress, cancel=cancel, stage=stage)
        if tuple(shape) == win:
            return x
        return F.interpolate(x[None, None], size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]

    def sample_multilevel(self, shape: Sequence[int], cond: Condition, refine_fraction: float = 0.5,
                          progress=None, cancel=None) -> torch.Tensor:
        """Multi-level synthesis: the image-level sample fixes the global layout, then patch-wise
        sampling from ``refine_fraction * T`` adds native-resolution detail."""
        if all(s <= self.window for s in shape):
            return self.sample(shape, cond, progress=progress, cancel=cancel)
        half = split_progress(progress, 0.0, 0.5)
        rest = split_progress(progress, 0.5, 1.0)
        coarse = self.sample_image_level(shape, cond, progress=half, cancel=cancel)
        t_refine = int(round(refine_fraction * (self.schedule.num_train_timesteps - 1)))
        return self.sample(shape, cond, x_init=coarse, t_start=t_refine, progress=rest, cancel=cancel,
                           stage="refinement")


def resize_condition(cond: Condition, shape: Sequence[int], size: Sequence[int]) -> Condition:
    """Conditions of a (D, H, W) grid resized to ``size``: anatomy as soft one-hot channels."""
    if tuple(shape) == tuple(size):
        return cond
    anat = None
    if cond.anatomy is not None:
        ch = anatomy.group_channels(cond.anatomy[None]) if cond.anatomy.ndim == 3 else cond.anatomy[None].float()
        anat = F.interpolate(ch, size=tuple(size), mode="trilinear", align_corners=True)[0]
    control = None
    if cond.control is not None:
        control = F.interpolate(cond.control[None].float(), size=tuple(size), mode="trilinear",
                                align_corners=True)[0]
    return Condition(cond.region, anat, control, cond.coord_range)


class ProgressTracker:
    """Turns (step, window) events into :class:`Progress` reports with a time estimate."""

    def __init__(self, callback: Optional[ProgressCallback], total_steps: int, stage: str):
        self.callback = callback
        self.total_steps = total_steps
        self.stage = stage
        self.t0 = time.monotonic()

    def window(self, step_index: int, done: int, total: int) -> None:
        if self.callback is None:
            return
        fraction = (step_index + done / max(total, 1)) / max(self.total_steps, 1)
        elapsed = time.monotonic() - self.t0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        self.callback(Progress(step=step_index + (1 if done == total else 0), total_steps=self.total_steps,
                               window=done, total_windows=total, stage=self.stage, fraction=fraction, eta_s=eta))


def split_progress(callback: Optional[ProgressCallback], start: float, end: float) -> Optional[ProgressCallback]:
    """A callback that maps a sub-run's fraction into [start, end] of the parent's."""
    if callback is None:
        return None

    t0 = time.monotonic()

    def sub(p: Progress) -> None:
        frac = start + (end - start) * p.fraction
        done = frac - start
        # assume the rest of the parent runs at this sub-run's pace
        eta = (time.monotonic() - t0) * (1 - frac) / done if done > 0 else None
        callback(Progress(p.step, p.total_steps, p.window, p.total_windows, p.stage, frac, eta))

    return sub
