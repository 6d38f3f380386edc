"""Checks before any work: a task's inputs, the grid it will sample and the memory it needs.

``run_task`` calls :func:`check_request` first, so the Python API refuses wrong types and
values with a ``ValueError`` before touching (or locking) the caller's arrays. The command
line calls it too, and :func:`request_warnings` and :func:`check_memory` before sampling.
No torch here: the worker and the Slicer module may call these before torch is installed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Optional, Sequence

import numpy as np

from .geometry import validate_ijk_to_ras
from .tasks.registry import TASKS, task_spec
from .volume import Volume

# A CT voxel edge outside this range is a header error, not a scan: the same range the
# synthesis task accepts for its ``spacing`` parameter (one place for the fact).
_SPACING_SPEC = TASKS["synthesize"].params["spacing"]
PLAUSIBLE_SPACING_MM = (float(_SPACING_SPEC.minimum), float(_SPACING_SPEC.maximum))

# Memory the sampler and the resampling around it need per voxel of the largest grid
# (float32 state, blend weights, conditions, float64 resampling coordinates). Measured: a
# 500 x 750 x 750 grid took 15.8 GB, 56 bytes per voxel; rounded up.
BYTES_PER_VOXEL = 64
# Share of the device's memory a run may plan to use by default.
MEMORY_SHARE = 0.8
# A mask covering more than this share of the image is probably a mistake: everything in it
# is regenerated (air and bone included).
LARGE_MASK_SHARE = 0.5
BODY_THRESHOLD_HU = -500.0

_REQUEST_VOLUMES = ("image", "anatomy", "mask")


def check_request(task: str, request) -> None:
    """Refuse, with a ``ValueError`` naming the field, a request ``run_task`` cannot use.

    Checks: the task exists; ``request`` is a ``TaskRequest``; each of image, anatomy and mask
    is None or a :class:`Volume` holding a 3-D, non-empty, real-valued numpy array with a
    valid geometry and a plausible voxel size; the image and mask are finite; the anatomy is
    whole numbers; ``params`` and ``anatomy_names`` are mappings; ``region`` is text; the
    inputs the task needs are there (image, mask); anomaly detection has a body to look at.
    """
    from .tasks.base import TaskRequest

    spec = task_spec(task)
    if not isinstance(request, TaskRequest):
        raise ValueError(f"request must be a TaskRequest, got {type(request).__name__}")
    for field in _REQUEST_VOLUMES:
        value = getattr(request, field)
        if value is not None:
            check_volume(value, field)
    if not isinstance(request.params, Mapping):
        raise ValueError(f"request.params must be a mapping of name -> value, got {type(request.params).__name__}")
    if request.anatomy_names is not None and not isinstance(request.anatomy_names, Mapping):
        raise ValueError("request.anatomy_names must be a mapping of label value -> name, got "
                         f"{type(request.anatomy_names).__name__}")
    if request.region is not None and not isinstance(request.region, str):
        raise ValueError(f"request.region must be text (head_neck, chest, abdomen or auto), got "
                         f"{type(request.region).__name__}")
    if spec.needs_image and request.image is None:
        raise ValueError(f"task {task!r} needs an input image")
    if spec.needs_mask and request.mask is None:
        raise ValueError(f"task {task!r} needs a mask: draw the region first")
    if request.image is not None and not np.all(np.isfinite(request.image.array)):
        raise ValueError("the image contains NaN or infinite values; fix or mask them first")
    if request.mask is not None:
        m = request.mask.array
        if m.dtype.kind == "f" and not np.all(np.isfinite(m)):
            raise ValueError("the mask contains NaN or infinite values; a mask is 0 outside and non-zero inside")
        if not np.any(m):
            raise ValueError("the mask is empty (no voxel is non-zero); draw the region first")
    if request.region not in (None, "", "auto"):
        from .preprocessing import check_region

        check_region(request.region)
    if request.anatomy is not None:
        a = request.anatomy.array
        if a.dtype.kind == "f" and not (np.all(np.isfinite(a)) and np.array_equal(a, np.rint(a))):
            raise ValueError("the anatomy label map holds non-integer values; it must hold whole label numbers")
    if task == "anomaly" and request.image is not None and not (request.image.array > BODY_THRESHOLD_HU).any():
        raise ValueError(f"no body found in the image (nothing above {BODY_THRESHOLD_HU:g} HU): anomaly detection "
                         "needs a patient")


def check_volume(volume, what: str) -> Volume:
    """``volume`` if it is a usable :class:`Volume`; a ``ValueError`` naming ``what`` otherwise."""
    if not isinstance(volume, Volume):
        raise ValueError(f"the {what} must be a MedDiffFMLib Volume (array + ijk_to_ras), got {type(volume).__name__}")
    arr = volume.array
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"the {what}'s array must be a numpy array, got {type(arr).__name__}")
    if arr.ndim != 3:
        raise ValueError(f"the {what} must be a 3-D volume (k, j, i); got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"the {what} is empty (shape {arr.shape})")
    if arr.dtype.kind == "c":
        raise ValueError(f"the {what} holds complex values ({arr.dtype}); only real-valued images are supported")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"the {what} must hold numbers, got dtype {arr.dtype}")
    try:
        validate_ijk_to_ras(volume.ijk_to_ras)
    except ValueError as e:
        raise ValueError(f"the {what} has an invalid geometry: {e}") from None
    check_spacing(volume.spacing_kji, what)
    return volume


def check_spacing(spacing_kji: Sequence[float], what: str) -> None:
    """Refuse a voxel size outside :data:`PLAUSIBLE_SPACING_MM`, quoting it."""
    lo, hi = PLAUSIBLE_SPACING_MM
    sp = [float(s) for s in spacing_kji]
    bad = [s for s in sp if not (lo <= s <= hi)]
    if bad:
        text = " x ".join(f"{s:g}" for s in sp)
        raise ValueError(f"the {what} has an implausible voxel size {text} mm (k, j, i): CT voxels are "
                         f"{lo:g} to {hi:g} mm; check the file's header (spacing)")


def request_warnings(task: str, request) -> list[str]:
    """Things that are allowed but probably not meant, one line each (after :func:`check_request`)."""
    out = []
    if request.mask is not None and task_spec(task).needs_mask:
        share = float(np.count_nonzero(request.mask.array)) / request.mask.array.size
        if share > LARGE_MASK_SHARE:
            out.append(f"the mask covers {100 * share:.0f}% of its volume: everything inside it is regenerated, "
                       "air and bone included; draw it around the region to change")
    return out


# --------------------------------------------------------------------------- grid and memory
def grid_voxels(task: str, reference_shape: Sequence[int], reference_spacing: Sequence[float],
                model_spacing_mm: Optional[float], params: Mapping) -> int:
    """Voxels of the largest grid a task samples on: the output grid, or the model's grid over
    the same extent, whichever is larger.

    Args:
        reference_shape, reference_spacing: the grid that gives the output's extent (k, j, i),
            voxels and mm (the image; for synthesis the anatomy, reference or shape/spacing).
        model_spacing_mm: the voxel size of a fixed-grid model, which resamples every input to
            it; None for a model that runs on the input's own grid.
        params: task parameters (super-resolution's ``factor`` multiplies the slices).
    """
    shape = [int(s) for s in reference_shape]
    extent = [n * float(s) for n, s in zip(shape, reference_spacing)]
    native = math.prod(shape)
    if task == "superres":
        factor = params.get("factor")
        if isinstance(factor, (list, tuple)):
            native = int(native * math.prod(float(f) for f in factor))
        else:
            # the default factor is the slice spacing over the in-plane spacing, rounded
            f = factor if factor is not None else max(1.0, round(float(reference_spacing[0]) / min(
                float(reference_spacing[1]), float(reference_spacing[2]))))
            native = int(native * float(f))
    if model_spacing_mm is None:
        return native
    model = math.prod(max(1, math.ceil(e / model_spacing_mm)) for e in extent)
    return max(native, model)


def device_memory_bytes(device: str) -> Optional[int]:
    """Total memory of ``device`` ("cpu", "cuda", "cuda:N"), or None where it cannot be told."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else 0
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(voxels: int, device: str, limit_gb: Optional[float] = None) -> int:
    """Refuse a grid whose estimated memory passes the limit; returns the estimate in bytes.

    Args:
        voxels: from :func:`grid_voxels`.
        device: the resolved device ("cpu", "cuda:0", ...).
        limit_gb: the most a run may use (default: :data:`MEMORY_SHARE` of the device's memory).
    """
    need = int(voxels) * BYTES_PER_VOXEL
    if limit_gb is not None:
        limit = float(limit_gb) * 1e9
        where = f"the limit of {limit_gb:g} GB"
    else:
        total = device_memory_bytes(device)
        if total is None:
            return need
        limit = MEMORY_SHARE * total
        where = f"{100 * MEMORY_SHARE:.0f}% of the {total / 1e9:.1f} GB of {'GPU' if device != 'cpu' else ''} memory"
        where = where.replace("of  memory", "of memory")
    if need > limit:
        raise ValueError(
            f"the model would sample {voxels / 1e6:.1f} million voxels (about {need / 1e9:.1f} GB), more than {where}; "
            "crop the image, resample it to a voxel size nearer the model's, or raise the limit "
            "(--max-memory-gb)")
    return need
