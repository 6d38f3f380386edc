"""Measuring tools of the speed benchmark: host and device memory peaks, FLOP counts, the bare
network and the sampler's step with the time inside its network calls."""

from __future__ import annotations

import inspect
import math
import os
import threading
import time
from typing import Optional, Sequence

import torch

from ..networks import REGION_INDEX, FoundationUNet, ModelConfig, NoisePredictor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


class PeakHostMemory:
    """Peak resident memory above the level at entry, sampled every 2 ms (Linux; None elsewhere)."""

    def __init__(self):
        self.peak_bytes: Optional[int] = None
        self._stop = threading.Event()

    def __enter__(self):
        self._start = _rss_bytes()
        self._peak = self._start
        if self._start is not None:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes() or 0)
        self.peak_bytes = self._peak - self._start


_FLOPS: dict[tuple[str, tuple[int, ...]], int] = {}


def count_flops(cfg: ModelConfig, window: Sequence[int]) -> int:
    """FLOPs (2 per multiply-add) of one network call on one window, counted on the meta device."""
    key = (cfg.to_json(), tuple(int(w) for w in window))
    if key not in _FLOPS:
        _FLOPS[key] = _count_flops(cfg, key[1])
    return _FLOPS[key]


def _count_flops(cfg: ModelConfig, window: tuple[int, ...]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        predictor = NoisePredictor(FoundationUNet(cfg)).eval()
        inputs = _window_inputs(cfg, tuple(window), 1, torch.device("meta"))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        predictor(*_call_args(predictor, inputs))
    return int(counter.get_total_flops())


def _window_inputs(cfg: ModelConfig, window: tuple[int, ...], batch: int, device: torch.device) -> dict:
    return {"x_t": torch.randn(batch, 1, *window, device=device),
            "t": torch.full((batch,), cfg.num_train_timesteps // 2, dtype=torch.long, device=device),
            "coords": torch.rand(batch, 3, *window, device=device) * 2 - 1,
            "anatomy_channels": torch.zeros(batch, cfg.anatomy_channels, *window, device=device),
            "region": torch.full((batch,), REGION_INDEX["abdomen"], dtype=torch.long, device=device),
            "spacing": torch.tensor([cfg.clamp_spacing((1.0, 1.0, 1.0))] * batch, device=device)}


def _call_args(predictor, inputs: dict) -> tuple:
    """Positional arguments of ``NoisePredictor.forward``, which every predictor takes (spacing
    only where it has it)."""
    names = list(inspect.signature(NoisePredictor.forward).parameters)[1:]
    return tuple(inputs[n] for n in names if n in inputs)


def _autocast(device: torch.device, precision: str):
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return torch.autocast("cpu", enabled=False)


def bare_network_seconds(predictor, window: Sequence[int], batch: int, device: torch.device, precision: str,
                         repeats: int = 2) -> float:
    """Seconds of one network call on ``batch`` windows whose inputs are already on the device
    (best of ``repeats`` after one warm-up call)."""
    inputs = _window_inputs(predictor.cfg, tuple(window), batch, device)
    args = _call_args(predictor, inputs)
    best = math.inf
    with torch.inference_mode(), _autocast(device, precision):
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            predictor(*args)
            _sync(device)
            if i > 0:
                best = min(best, time.perf_counter() - t0)
    return best


class TimedPredictor(torch.nn.Module):
    """Forwards every call to ``predictor`` and adds up the seconds spent inside (the device
    synchronised before and after, so that queued work is charged to the right side)."""

    def __init__(self, predictor):
        super().__init__()
        self.inner = predictor
        self.cfg = predictor.cfg
        self.controlnet = getattr(predictor, "controlnet", None)
        self.seconds = 0.0
        self.calls = 0

    def forward(self, *args, **kwargs):
        device = args[0].device
        _sync(device)
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        _sync(device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def _sampler(predictor, device: torch.device, steps: int, batch_size: int, precision: str):
    from ..sampling import PatchSampler, SamplerOptions

    return PatchSampler(predictor, SamplerOptions(steps=steps, batch_size=batch_size, precision=precision, seed=0),
                        device)


def window_layout(predictor, shape: Sequence[int], batch_size: int = 4) -> tuple[tuple[int, ...], int]:
    """(window size, window count) of one step over a volume of ``shape``."""
    layout = _sampler(predictor, torch.device("cpu"), 1, batch_size, "fp32").layout(tuple(shape))
    return tuple(layout.window), len(layout.slices)


def sampler_step_seconds(predictor, shape: Sequence[int], spacing_mm: Sequence[float], device: torch.device,
                         steps: int, batch_size: int, precision: str) -> tuple[float, float]:
    """(seconds per step, of which inside the network) of the patch sampler over a whole volume
    (``steps`` steps from noise, region "abdomen", no anatomy), averaged; includes drawing the
    initial noise."""
    from ..sampling import Condition

    timed = TimedPredictor(predictor)
    sampler = _sampler(timed, device, steps, batch_size, precision)
    _sync(device)
    t0 = time.perf_counter()
    sampler.sample(tuple(shape), Condition(spacing=tuple(float(v) for v in spacing_mm),
                                           region=REGION_INDEX["abdomen"]))
    _sync(device)
    return (time.perf_counter() - t0) / steps, timed.seconds / steps
