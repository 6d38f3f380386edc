"""Shared pieces of the training tests: small synthetic cases, a tiny trainer, state hashes."""

import hashlib

import torch

from MedDiffFMLib.networks import preset
from MedDiffFMLib.training import Case, Trainer, TrainOptions


def grid_coords(shape):
    return torch.stack(torch.meshgrid(*[torch.linspace(-1.0, 1.0, n) for n in shape], indexing="ij"))


def linear(c):
    """A volume that is a linear function of the whole-volume coordinates."""
    return 0.3 * c[0] + 0.5 * c[1] - 0.2 * c[2]


def structured_cases(n=2, shape=(12, 12, 12), seed=0):
    """Small smooth synthetic volumes with group maps (no phantoms needed)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for i in range(n):
        c = grid_coords(shape)
        r = (c ** 2).sum(0).sqrt()
        image = torch.where(r < 0.6 + 0.1 * i, 0.4, -0.8) + 0.05 * torch.randn(shape, generator=g)
        groups = (r < 0.6 + 0.1 * i).to(torch.int8) * (2 + i)
        cases.append(Case(image.float(), (2.0, 1.5, 1.5), groups, region=1 + i, name=f"synthetic-{i}"))
    return cases


def state_hash(sd):
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def small_trainer(out, steps, **kw):
    cfg = preset("tiny", window=8)
    kw = {"checkpoint_every": 10_000, **kw}
    opts = TrainOptions(steps=steps, batch_size=2, lr=1e-3, ema_decay=0.9, progress=False, seed=3, **kw)
    return Trainer(structured_cases(), out, opts, cfg, device="cpu")
