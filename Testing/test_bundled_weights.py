"""The bundled demo weights, as shipped: a broken release fails here.

Every registered model verifies against its sha256, loads, and runs its tasks on a small
held-out case at a clinical voxel size with the do-no-harm guarantees intact.
"""

from __future__ import annotations

import numpy as np
import pytest

from MedDiffFMLib import preprocessing, weights
from MedDiffFMLib.conditions import slab_means
from MedDiffFMLib.benchmark.cases import clinical_grid
from MedDiffFMLib.heldout import make_heldout_case
from MedDiffFMLib.tasks import TaskRequest, run_task
from MedDiffFMLib.volume import Volume

pytestmark = pytest.mark.usefixtures("single_thread")


def test_every_registered_model_verifies():
    entries = weights.list_models()
    ids = {e.id for e in entries}
    assert {"meddifffm-demo-base", "meddifffm-demo-superres", "meddifffm-demo-lesion"} <= ids
    for e in entries:
        path = weights.resolve_model(e.id, kind=e.kind, task=e.task)
        assert weights.verify(path) == e.sha256


@pytest.fixture(scope="module")
def clinical_case():
    """A small held-out abdomen case on an oblique clinical grid with 2.5 mm slices (never seen in training)."""
    matrix, shape = clinical_grid("abdomen", 424242, (20.0, 32.0, 32.0), slice_mm=2.5)
    return make_heldout_case("abdomen", 424242, matrix, shape)


def test_bundled_weights_run_denoise_and_superres(clinical_case):
    truth = clinical_case.clean_hu
    rng = np.random.default_rng(0)
    noisy = (truth + rng.normal(0, 25.0, truth.shape)).astype(np.float32)
    image = Volume(noisy, clinical_case.ijk_to_ras)
    res = run_task("denoise", TaskRequest(image=image, region="abdomen"), device="cpu")
    out = res.volumes["denoised"].array
    assert out.shape == noisy.shape and np.isfinite(out).all()
    assert np.abs(out - noisy).max() <= 4 * res.scores["noise_level_hu"] + 1e-3

    res = run_task("superres", TaskRequest(image=Volume(truth.astype(np.float32), clinical_case.ijk_to_ras),
                                           region="abdomen", params={"factor": 2, "steps": 4}), device="cpu")
    sr = res.volumes["superres"].array
    assert sr.shape == (2 * truth.shape[0], *truth.shape[1:]) and np.isfinite(sr).all()
    lo, hi = preprocessing.window_bounds("abdomen")
    inside = (truth > lo) & (truth < hi)
    assert np.abs(slab_means(sr.astype(np.float64), 2) - truth)[inside].max() <= 0.5
