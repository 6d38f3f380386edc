"""Stand-ins and small tensors shared by the sampler tests."""

import torch


class Recorder(torch.nn.Module):
    """Stands in for a :class:`NoisePredictor`: records every call and either delegates to the
    wrapped predictor or returns ``fn(x_t, t, coords, anatomy, region)``; keeps the voxel size
    each window was told."""

    def __init__(self, inner=None, fn=None, cfg=None):
        super().__init__()
        self.inner = inner
        self.fn = fn
        self._cfg = cfg if cfg is not None else inner.cfg
        self.calls = []

    @property
    def cfg(self):
        return self._cfg

    def forward(self, x_t, t, coords, anatomy_channels, region, spacing, control=None, control_scale=1.0):
        self.calls.append({"x": x_t.clone(), "t": t.clone(), "coords": coords.clone(),
                           "anatomy": anatomy_channels.clone(), "region": region.clone(),
                           "spacing": spacing.clone()})
        if self.fn is not None:
            return self.fn(x_t, t, coords, anatomy_channels, region)
        return self.inner(x_t, t, coords, anatomy_channels, region, spacing, control, control_scale)

    def windows(self):
        """Every window seen, in order: (x, coords, anatomy, region, t) per window."""
        out = []
        for c in self.calls:
            for b in range(c["x"].shape[0]):
                out.append((c["x"][b, 0], c["coords"][b], c["anatomy"][b], int(c["region"][b]), int(c["t"][b])))
        return out


def global_coords(shape):
    axes = [torch.linspace(-1.0, 1.0, n) if n > 1 else torch.zeros(1) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def noise(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def diffs_k(v):
    """Mean absolute voxel-to-voxel difference between consecutive k planes."""
    return (v[1:] - v[:-1]).abs().mean(dim=(1, 2))
