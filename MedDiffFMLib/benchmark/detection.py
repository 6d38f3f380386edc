"""Anomaly detection: the model with and without an anatomy label map, beside an organ-median baseline."""

from __future__ import annotations

import time

import numpy as np

from .. import metrics
from . import baselines
from .options import ANOMALY_LESIONS, BACKGROUND_NOISE_HU
from .task_facts import primary_segmentation, primary_volume

CAPTIONS = {
    "anomaly": (
        f"Each case twice: with {ANOMALY_LESIONS} lesions (3-30 mm, hypo- or hyperdense, round or irregular) and "
        f"without, same anatomy, both with {BACKGROUND_NOISE_HU:g} HU of the family's noise. Model: partial diffusion "
        "and reconstruction, with the phantom's label map as the anatomy condition (as a TotalSegmentator result "
        "would be) and without one. With the labels, the task caps the model's map by the z-score of each voxel's "
        "deviation from its organ's median (its organ check), so it flags only what both call anomalous; the last "
        "row is the model's own map, with labels and without that check. Baseline: |HU - median HU of the voxel's "
        "label| in window units, smoothed by 1.5 mm, robust z-score per anatomy group, mask = z > 4 (it needs the "
        "labels). Voxel AUROC and Dice inside the body of lesion cases; volume AUROC over lesion (positive) and "
        "healthy (negative) volumes with one score rule for every method (the maximum in the body of its map "
        "smoothed at 3 mm); flagged = mask volume on healthy cases (lower is better)."),
}
BASELINE_SMOOTHING_MM = 1.5


def _safe_auroc(scores, labels):
    try:
        return metrics.auroc(scores, labels)
    except ValueError:
        return None


def run_anomaly(ctx, family: str) -> None:
    from ..tasks import TaskRequest, anomaly
    from ..tasks.registry import TASKS

    # the baseline's mask follows the model's rule (threshold, smallest component)
    defaults = {k: TASKS["anomaly"].params[k].default for k in ("threshold", "min_size_mm3")}
    opts = ctx.opts
    methods = ("model, with anatomy labels", "model, no labels", "organ-median deviation (labels)",
               "model, labels, no organ check")
    model_runs = ((methods[0], True, {}), (methods[1], False, {}), (methods[3], True, {"organ_check": False}))
    volume_scores: dict[str, list[float]] = {m: [] for m in methods}
    truth: list[bool] = []
    for i in range(opts.cases):
        for with_lesions in (True, False):
            try:
                case = ctx.case(family, i, lesions=with_lesions)
            except ValueError as e:  # no room for a lesion in this field of view
                ctx.notes.append(f"anomaly: case {i + 1} of the {family} family skipped ({e})")
                break
            if with_lesions and not case.lesion_mask.any():
                ctx.notes.append(f"anomaly: {case.name} has no lesion voxel on its grid; skipped")
                break
            body = case.body
            image = case.noisy(BACKGROUND_NOISE_HU, case.seed + (1 if with_lesions else 0))
            maps = {}
            for method, anatomy, extra in model_runs:
                request = TaskRequest(image=case.volume(image), region=case.region,
                                      anatomy=case.label_volume() if anatomy else None,
                                      anatomy_names=case.label_names if anatomy else None,
                                      params=ctx.params("anomaly", **extra))
                res, secs = ctx.run_model("anomaly", request)
                maps[method] = (primary_volume("anomaly", res).array,
                                np.asarray(primary_segmentation("anomaly", res).array, dtype=bool), secs)
            t0 = time.monotonic()
            deviation = baselines.organ_deviation_map(image, case.labels, case.region, BASELINE_SMOOTHING_MM,
                                                      case.spacing_kji)
            zmap = baselines.zscore_by_tissue(deviation, case.labels, case.label_names)
            maps[methods[2]] = (zmap, anomaly.anomaly_mask(zmap, body, defaults["threshold"],
                                                           anomaly.min_voxels(defaults["min_size_mm3"], case.voxel_ml)),
                                time.monotonic() - t0)
            truth.append(with_lesions)
            condition = "lesion cases" if with_lesions else "healthy cases"
            for method, (amap, mask, seconds) in maps.items():
                volume_scores[method].append(anomaly.volume_score(amap, body, case.spacing_kji))
                if with_lesions:
                    ctx.add(family, "anomaly", condition, method, case.name,
                            voxel_auroc=_safe_auroc(amap[body], case.lesion_mask[body]),
                            dice=metrics.dice(mask, case.lesion_mask), seconds=seconds)
                else:
                    ctx.add(family, "anomaly", condition, method, case.name,
                            flagged_ml=float(mask.sum()) * case.voxel_ml, seconds=seconds)
            ctx.log(f"anomaly {case.name} ({condition}): model {maps[methods[0]][2]:.1f} s")
    for method, scores in volume_scores.items():
        auc = _safe_auroc(np.asarray(scores), np.asarray(truth[: len(scores)], dtype=bool)) if scores else None
        if auc is None:
            ctx.notes.append(f"anomaly ({family}): volume AUROC of {method} undefined (needs lesion and healthy volumes)")
        ctx.add(family, "anomaly", "all volumes", method, f"{len(scores)} volumes", n=len(scores), volume_auroc=auc)
