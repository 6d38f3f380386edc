"""Task requests on the ``task_phantom`` fixture, shared by the zero-shot task tests."""

from __future__ import annotations

import numpy as np

from MedDiffFMLib import preprocessing
from MedDiffFMLib.tasks import TaskRequest
from MedDiffFMLib.volume import Volume

REGION = "abdomen"
# denoise runs DDPM steps here: its DDIM chain starts from the image itself and draws no noise
PARAMS = {"denoise": {"steps": 2, "method": "ddpm"}, "anomaly": {"steps": 2}, "synthesize": {"steps": 2}}
UNKNOWN_NAME = "unicorn_gland"
UNNAMED_LABEL = 249


def image_of(ph, writeable: bool = True) -> Volume:
    arr = np.array(ph.hu, dtype=np.float32, copy=True)
    arr.flags.writeable = writeable
    return Volume(arr, ph.ijk_to_ras.copy())


def anatomy_of(ph, writeable: bool = True) -> tuple[Volume, dict]:
    """The phantom's labels on a grid of their own (1.5 mm), with a block of a class the model does
    not know and a block of a label value without a name."""
    labels, m = preprocessing.resample(np.asarray(ph.labels, dtype=np.int32), ph.ijk_to_ras, (1.5, 1.5, 1.5), order=0)
    labels = np.array(labels, copy=True)
    c = [s // 2 for s in labels.shape]
    labels[c[0] - 3: c[0] + 3, c[1] - 4: c[1], c[2] - 3: c[2] + 3] = 250
    labels[c[0] - 3: c[0] + 3, c[1]: c[1] + 4, c[2] - 3: c[2] + 3] = UNNAMED_LABEL
    labels.flags.writeable = writeable
    names = {**ph.label_names, 250: UNKNOWN_NAME}
    return Volume(labels, m), names


def request_for(task, ph, params=None, writeable=True, anatomy=True, **kw) -> TaskRequest:
    anat, names = anatomy_of(ph, writeable) if anatomy else (None, None)
    return TaskRequest(image=image_of(ph, writeable), region=REGION, anatomy=anat, anatomy_names=names,
                       params={**PARAMS[task], **(params or {})}, **kw)
