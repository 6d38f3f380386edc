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
