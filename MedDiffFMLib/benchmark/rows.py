"""The benchmark's numbers: one value per case for each (family, section, condition, method, metric)."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional

import numpy as np

# metric key -> (column label, decimals)
METRICS: dict[str, tuple[str, int]] = {
    "psnr_db": ("PSNR (dB)", 2),
    "ssim": ("SSIM", 3),
    "edge_ratio": ("edge sharpness (out/truth)", 3),
    "rms_change_hu": ("RMS change (HU)", 2),
    "sigma_hu": ("noise sigma used (HU)", 1),
    "slab_max_error_hu": ("slab-mean max error (HU)", 2),
    "slab_rms_error_hu": ("slab-mean RMS error (HU)", 2),
    "model_weight": ("model detail weight (self-check)", 2),
    "voxel_auroc": ("voxel AUROC", 3),
    "volume_auroc": ("volume AUROC", 3),
    "dice": ("Dice", 3),
    "flagged_ml": ("flagged (ml)", 2),
    "outside_identical": ("outside identical", 4),
    "abs_delta_mean_hu": ("|mask - ring mean| (HU)", 1),
    "std_ratio": ("texture std ratio (mask/ring)", 2),
    "abs_contrast_hu": ("|contrast| (HU)", 1),
    "threshold_dice": ("threshold Dice", 3),
    "ceiling_fraction": ("Dice / ceiling", 3),
    "seconds": ("time (s)", 1),
}


class Rows:
    """Values in insertion order; :meth:`records` gives mean, sample std and n per key."""

    def __init__(self) -> None:
        self.data: "OrderedDict[tuple, dict]" = OrderedDict()

    def add(self, family: str, section: str, condition: str, method: str, case: str, n: Optional[int] = None,
            **values) -> None:
        """One value per metric keyword; ``n``: how many cases one pooled value stands for."""
        for metric, value in values.items():
            if metric not in METRICS:
                raise KeyError(f"unknown metric {metric!r}")
            rec = self.data.setdefault((family, section, condition, method, metric),
                                       {"values": [], "cases": [], "n": None})
            rec["values"].append(None if value is None else float(value))
            rec["cases"].append(case)
            if n is not None:
                rec["n"] = int(n)

    def records(self) -> list[dict]:
        out = []
        for (family, section, condition, method, metric), rec in self.data.items():
            finite = [v for v in rec["values"] if v is not None and math.isfinite(v)]
            n = len(finite)
            out.append({"family": family, "section": section, "condition": condition, "method": method,
                        "metric": metric, "mean": float(np.mean(finite)) if n else None,
                        "std": float(np.std(finite, ddof=1)) if n >= 2 else None,
                        "n": rec["n"] if rec["n"] is not None and n else n,
                        "values": rec["values"], "cases": rec["cases"]})
        return out


def find_row(result: dict, family: str, section: str, condition: str, method: str, metric: str) -> Optional[dict]:
    """The record of one (family, section, condition, method, metric), or None."""
    key = (family, section, condition, method, metric)
    for r in result["rows"]:
        if (r["family"], r["section"], r["condition"], r["method"], r["metric"]) == key:
            return r
    return None
