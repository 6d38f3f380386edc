"""Pretraining and ControlNet fine-tuning: one loop, single process or ``torchrun`` DDP.

Training cases are held in memory in model units on their own grids (any voxel size). Each
training sample is drawn *multi-level* (after MedDiff-FM), with equal probability:

(a) image level: the whole volume resized to the window;
(b) a random crop of twice the window, resized to the window;
(c) a native-resolution crop of the window.

In all three the coordinate channels tell where the sample sits in the whole volume, and the
voxel-size channels what one voxel of the sample measures (mm per axis): resizing makes the
three levels three voxel sizes of the same anatomy, so with cases drawn at 0.5-5 mm the model
learns one prior over the whole range of clinical grids. Region
and anatomy conditions are dropped at random so that null conditions work at inference
(classifier-free guidance, or no anatomy at hand).

Exact resume: all randomness (crops, dropout, timesteps, noise) comes from one torch
Generator per rank whose state is checkpointed with the weights, the EMA and the optimizer.

Modules: :mod:`.cases` (training cases and their sources), :mod:`.options`, :mod:`.samples`
(multi-level samples and batches) and :mod:`.loop` (the trainer, its loss, warm starts).
"""

from .cases import (PHANTOM_FAMILIES, Case, case_from_arrays, clinical_range, draw_phantom, manifest_cases,
                    phantom_cases, random_training_grid)
from .loop import DiffusionLoss, Trainer, warm_start
from .options import TrainOptions
from .samples import draw_batch, draw_sample

__all__ = ["Case", "TrainOptions", "Trainer", "DiffusionLoss", "draw_sample", "draw_batch", "warm_start",
           "case_from_arrays", "clinical_range", "draw_phantom", "PHANTOM_FAMILIES", "manifest_cases", "phantom_cases",
           "random_training_grid"]
