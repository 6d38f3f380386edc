"""Requests, grids and constants shared by the ControlNet task tests (superres, lesion, inpaint)."""

from __future__ import annotations

import numpy as np

from MedDiffFMLib.geometry import make_ijk_to_ras, voxel_to_ras
from MedDiffFMLib.tasks import TaskRequest, run_task
from MedDiffFMLib.volume import Volume

REGION = "abdomen"
TASKS = ("superres", "lesion", "inpaint")
CN = {"superres": "superres", "lesion": "lesion", "inpaint": "lesion"}
# superres without its self-check: with random weights the check keeps no model detail, and the
# result (the parabolic reconstruction) would not depend on the seed these tests vary
PARAMS = {"superres": {"steps": 2, "self_check": False}, "lesion": {"steps": 2},
          "inpaint": {"steps": 3, "jump_length": 1, "jump_n_sample": 2}}
OUTPUTS = {"superres": ({"superres"}, set()), "lesion": ({"lesion"}, {"lesion"}),
           "inpaint": ({"inpainted"}, {"inpainted_region"})}
MASKED = ("lesion", "inpaint")
UNKNOWN_NAME = "unicorn_gland"


def centre_ras(m, shape) -> np.ndarray:
    return voxel_to_ras(m, np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, (shape[0] - 1) / 2]))[0]


def ball_mask(m, shape, centre, radius_mm) -> np.ndarray:
    """Voxels of the grid (m, shape) whose centre lies within ``radius_mm`` of ``centre`` (RAS)."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    ras = voxel_to_ras(m, np.stack([i.ravel(), j.ravel(), k.ravel()], 1))
    return (np.linalg.norm(ras - centre, axis=1) <= radius_mm).reshape(shape)


def mask_of(ph, writeable=True) -> Volume:
    mask = ball_mask(ph.ijk_to_ras, ph.hu.shape, centre_ras(ph.ijk_to_ras, ph.hu.shape), 4.0)
    mask.flags.writeable = writeable
    return Volume(mask, ph.ijk_to_ras.copy())


def anatomy_of(ph, writeable=True) -> tuple[Volume, dict]:
    labels = np.array(ph.labels, dtype=np.int32)
    labels[2:5, 3:8, 3:8] = 250
    labels.flags.writeable = writeable
    return Volume(labels, ph.ijk_to_ras.copy()), {**ph.label_names, 250: UNKNOWN_NAME}


def request_for(task, ph, params=None, writeable=True, mask=True, anatomy=True) -> TaskRequest:
    img = np.array(ph.hu, dtype=np.float32)
    img.flags.writeable = writeable
    anat, names = anatomy_of(ph, writeable) if anatomy else (None, None)
    return TaskRequest(image=Volume(img, ph.ijk_to_ras.copy()), region=REGION, anatomy=anat, anatomy_names=names,
                       mask=mask_of(ph, writeable) if (mask and task in MASKED) else None,
                       params={**PARAMS[task], **(params or {})})


def run(task, request, model, cns, **kw):
    return run_task(task, request, model, controlnet=cns[CN[task]], device="cpu", **kw)


def raw_volume(array, m) -> Volume:
    v = Volume(np.zeros((1, 1, 1), np.float32), m)
    v.array = array
    return v


def first_corner(m) -> np.ndarray:
    return voxel_to_ras(m, np.array([-0.5, -0.5, -0.5]))[0]


def oblique(spacing_kji, origin=(-7.5, 30.0, -12.25)) -> np.ndarray:
    """A grid with the given spacing, a non-zero origin and an oblique direction (a rotation by
    0.7 rad about (1, 3, -2))."""
    a = np.array([1.0, 3.0, -2.0]) / np.sqrt(14.0)
    k = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    rot = np.eye(3) + np.sin(0.7) * k + (1.0 - np.cos(0.7)) * (k @ k)
    return make_ijk_to_ras(spacing_kji, origin, rot)
