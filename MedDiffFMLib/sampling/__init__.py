"""Whole-volume, patch-wise sampling in two parts (after k-diffusion's split):

* :mod:`.denoiser`: :class:`PatchDenoiser`, a callable ``(x_t, t) -> eps`` over a whole volume
  (windows, blending, guidance, ControlNet scale, device-resident state), made by
  :class:`PatchSampler` per grid;
* :mod:`.chains`: short reverse chains over any such callable: DDIM/DDPM, partial diffusion,
  DiffPIR, RePaint, coarse-to-fine.

No task runs a reverse loop of its own.
"""

from .chains import (ProgressTracker, coarse_to_fine, diffpir, noised, partial_diffusion, repaint,
                     repaint_schedule, resize, resize_condition, sample_chain, split_progress)
from .denoiser import MIRROR_AXES, Condition, MirrorEnsemble, PatchDenoiser, PatchSampler, SamplerOptions, mirrored
from .layout import WindowLayout, axis_coordinates, blend_weight, inverse_weight_sum, make_layout, window_starts

__all__ = ["MIRROR_AXES", "Condition", "MirrorEnsemble", "mirrored", "PatchDenoiser", "PatchSampler", "SamplerOptions",
           "ProgressTracker", "coarse_to_fine", "diffpir", "noised", "partial_diffusion", "repaint", "repaint_schedule",
           "resize", "resize_condition", "sample_chain", "split_progress", "WindowLayout", "axis_coordinates",
           "blend_weight", "inverse_weight_sum", "make_layout", "window_starts"]
