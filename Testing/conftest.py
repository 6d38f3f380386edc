"""Shared fixtures for the MedDiffFMLib tests.

Add new shared fixtures below, grouped by topic. Keep them cheap: the whole suite must run
on a couple of CPU cores. Session-scoped fixtures hand out objects that tests must treat as
read-only (copy before modifying).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from MedDiffFMLib.geometry import make_ijk_to_ras

# One intra-op thread unless OMP_NUM_THREADS says otherwise: the tiny networks gain nothing
# from more, and on shared, busy cores extra threads spin and slow everything down.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)

# ------------------------------------------------------------------------------- constants
TINY_MODEL_SEED = 1234
"""Seed of the random initialisation of the tiny test model."""

OBLIQUE_SPACING_KJI = (2.5, 0.8, 0.7)
OBLIQUE_ORIGIN_RAS = (-31.5, 17.25, 102.0)


def rotation_about_axis(axis, angle: float) -> np.ndarray:
    """3x3 rotation by ``angle`` (radians) about ``axis`` (Rodrigues' formula)."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * (k @ k)


class Recorder:
    """Progress callback that keeps the fractions; ``cancel`` turns True after ``cancel_after`` reports."""

    def __init__(self, cancel_after=None):
        self.fractions: list[float] = []
        self.cancel_after = cancel_after

    def __call__(self, p) -> None:
        self.fractions.append(p.fraction)

    def cancel(self) -> bool:
        return self.cancel_after is not None and len(self.fractions) >= self.cancel_after


def euler_rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """3x3 rotation Rz(az) @ Ry(ay) @ Rx(ax), angles in radians."""
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# ------------------------------------------------------------------------------- geometry
@pytest.fixture
def oblique_ijk_to_ras() -> np.ndarray:
    """An oblique, anisotropic, partly flipped grid (a fresh copy per test).

    Direction: a rotation of 0.6 rad about the oblique axis (1, 2, 3), with the j axis
    flipped (determinant -1). Spacing (k, j, i) = (2.5, 0.8, 0.7) mm; non-zero origin.
    """
    direction = rotation_about_axis((1.0, 2.0, 3.0), 0.6) @ np.diag([1.0, -1.0, 1.0])
    return make_ijk_to_ras(OBLIQUE_SPACING_KJI, OBLIQUE_ORIGIN_RAS, direction)


# ------------------------------------------------------------------------------- models
def randomize_zero_init(module: torch.nn.Module) -> torch.nn.Module:
    """Give MONAI's zero-initialised convolutions (the output convolution, the second convolution
    of every residual block) PyTorch's default random init, in place.

    A freshly built MONAI diffusion U-Net predicts exactly zero everywhere; tests of the sampler
    need a network whose output depends on its inputs. ControlNet zero convolutions are left
    alone (this is applied to foundation networks only).
    """
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv3d) and not m.weight.any():
                m.reset_parameters()
    return module


@pytest.fixture(scope="session")
def make_tiny_model():
    """Factory: ``make_tiny_model(seed=0, **config_overrides)`` -> a :class:`FoundationUNet` of the
    ``tiny`` preset with seeded, non-degenerate random weights, in eval mode."""
    from MedDiffFMLib.networks import FoundationUNet, preset

    def make(seed: int = 0, **overrides):
        cfg = preset("tiny", **overrides)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = randomize_zero_init(FoundationUNet(cfg))
        return model.eval()

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, make_tiny_model) -> Path:
    """A model directory (``config.json`` + ``model.safetensors``) with the ``tiny`` preset and
    seeded random weights. Read-only: copy it before modifying anything in it."""
    from MedDiffFMLib.checkpoint import save_model

    model = make_tiny_model(TINY_MODEL_SEED)
    return save_model(tmp_path_factory.mktemp("tiny_model") / "model", model.cfg, model.state_dict())


@pytest.fixture
def tiny_predictor(tiny_model_dir):
    """A fresh :class:`NoisePredictor` loaded from ``tiny_model_dir`` (on the CPU, eval mode)."""
    from MedDiffFMLib.checkpoint import load_base
    from MedDiffFMLib.networks import NoisePredictor

    return NoisePredictor(load_base(tiny_model_dir, "cpu")).eval()


# ------------------------------------------------------------------------------- tasks
TASK_SPACING_KJI = (2.0, 1.0, 1.2)
TASK_ORIGIN_RAS = (12.5, -40.0, 7.25)


def task_grid(spacing_kji=TASK_SPACING_KJI, origin_ras=TASK_ORIGIN_RAS, angle: float = 0.4) -> np.ndarray:
    """An oblique ``ijk_to_ras`` (rotation by ``angle`` about the axis (2, -1, 1)) with the given
    spacing (k, j, i) and a non-zero origin."""
    return make_ijk_to_ras(spacing_kji, origin_ras, rotation_about_axis((2.0, -1.0, 1.0), angle))


@pytest.fixture(scope="session")
def task_phantom():
    """A small noisy abdomen phantom, (k, j, i) = (8, 16, 14) voxels on an oblique, anisotropic
    grid (:func:`task_grid`, spacing 2.0, 1.0, 1.2 mm), which tasks sample on as it is.
    Read-only: copy its arrays before handing them to code that may modify them."""
    from MedDiffFMLib.phantoms import make_phantom

    return make_phantom("abdomen", shape_kji=(8, 16, 14), spacing_kji=TASK_SPACING_KJI, seed=11, noise_hu=15.0,
                        ijk_to_ras=task_grid())


@pytest.fixture(scope="session")
def tiny_controlnet_dirs(tmp_path_factory, tiny_model_dir) -> dict:
    """ControlNet directories on ``tiny_model_dir``: ``{"superres": ..., "lesion": ...}``.

    Built the way fine-tuning starts (``ControlNetConfig`` with the base's sha256,
    ``TaskControlNet.init_from_base``), then
    the zero convolutions get seeded random weights so that the control condition changes the
    output. The superres one is "trained" for factors 2 to 6. Read-only: copy a directory before modifying anything in it.
    """
    from MedDiffFMLib.checkpoint import load_base, save_model, sha256_file
    from MedDiffFMLib.conditions import CONTROL_CHANNELS
    from MedDiffFMLib.networks import ControlNetConfig, TaskControlNet

    base = load_base(tiny_model_dir, "cpu")
    sha = sha256_file(tiny_model_dir / "model.safetensors")
    root = tmp_path_factory.mktemp("tiny_controlnets")
    dirs = {}
    specs = (("superres", CONTROL_CHANNELS["superres"], {"factors": [2, 3, 4, 5, 6]}),
             ("lesion", CONTROL_CHANNELS["lesion"], {}))
    for n, (task, channels, params) in enumerate(specs):
        cfg = ControlNetConfig(task, channels, base.cfg, base_sha256=sha, params=params)
        with torch.random.fork_rng():
            torch.manual_seed(TINY_MODEL_SEED + 1 + n)
            cn = TaskControlNet(cfg)
            cn.init_from_base(base)
            with torch.no_grad():
                for m in cn.modules():
                    if isinstance(m, torch.nn.Conv3d) and not m.weight.any():
                        m.reset_parameters()
        dirs[task] = save_model(root / task, cfg, cn.state_dict())
    return dirs


@pytest.fixture
def network_calls(monkeypatch) -> list:
    """Counts foundation-network evaluations: the returned list gets the batch size of every call
    (one call per batch of windows, whatever model or task runs)."""
    from MedDiffFMLib.networks import FoundationUNet

    calls: list = []
    original = FoundationUNet.forward

    def counting(self, x_t, *args, **kwargs):
        calls.append(int(x_t.shape[0]))
        return original(self, x_t, *args, **kwargs)

    monkeypatch.setattr(FoundationUNet, "forward", counting)
    return calls


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for the module's tests (the CPU is shared); restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def interrupt_run_task(monkeypatch):
    """``install(exc)``: replace run_task (as the CLI looks it up) by the real one interrupted after
    the first progress report: by its cancel flag (exc=None) or by raising ``exc`` from the
    callback. Returns the list of progress fractions seen."""
    import MedDiffFMLib.tasks as tasks

    real = tasks.run_task

    def install(exc):
        seen = []

        def interrupted(task, request, model=None, **kw):
            def progress(p):
                seen.append(p.fraction)
                if exc is not None:
                    raise exc()

            kw.update(progress=progress, cancel=lambda: bool(seen))
            return real(task, request, model, **kw)

        monkeypatch.setattr(tasks, "run_task", interrupted)
        return seen

    return install
