"""What a benchmark run measures, and the fixed choices behind it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

SECTIONS = ("denoise", "anomaly", "synthesis", "superres", "inpaint", "lesion")
PARABOLIC = "parabolic slabs (PPM)"  # the one-dimensional slab reconstruction the TV one starts from
SLAB_TV = "total-variation slabs"  # the classical super-resolution baseline the task itself builds on
UNPHASED_SYNTHESIS = "model, phase not given"  # synthesis on the task's default contrast phase
SECTION_TITLES = {"denoise": "Denoising", "anomaly": "Anomaly detection", "synthesis": "Synthesis from anatomy",
                  "superres": "Super-resolution", "inpaint": "Inpainting", "lesion": "Lesion generation"}
SECTION_ALIASES = {"denoise": "denoise", "denoising": "denoise", "anomaly": "anomaly", "synthesis": "synthesis",
                   "synthesize": "synthesis", "superres": "superres", "super-resolution": "superres",
                   "inpaint": "inpaint", "inpainting": "inpaint", "lesion": "lesion"}
# benchmark section -> the task it runs through run_task
SECTION_TASK = {"denoise": "denoise", "anomaly": "anomaly", "synthesis": "synthesize", "superres": "superres",
                "inpaint": "inpaint", "lesion": "lesion"}
FAMILIES = ("heldout", "training")
FAMILY_TITLES = {"heldout": "held-out family", "training": "training family"}
REGIONS = ("head_neck", "chest", "abdomen")

SEED_START = 200_000  # training phantoms use seeds below 10 000
SEEDS_PER_CASE = 10
TUNING_SEED_OFFSET = 900_000
FOV_MM = (48.0, 128.0, 128.0)  # (k, j, i): a clinical field of view cropped around the region's focus
INPLANE_MM = (0.6, 0.9)
SLICE_MM = (1.0, 5.0)
SUPERRES_THIN_MM = (0.8, 1.0)
MAX_TILT_DEG = (3.0, 15.0)  # every grid is oblique: never the model's own grid
NOISE_LEVELS_HU = (15.0, 25.0, 40.0)
SUPERRES_FACTORS = (3, 5)
BACKGROUND_NOISE_HU = 12.0  # anomaly, inpainting and lesion inputs: a clinical scan is never noise-free
ANOMALY_LESIONS = 2
GAUSSIAN_SIGMAS_MM = (0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2)
NLM_PATCH_SIZE = 5
NLM_PATCH_DISTANCE = 2  # as good as 3 on these cases (measured), 2.4x faster
NLM_H_FACTOR = 0.8
MIN_GROUP_FRACTION = 0.005
QUICK_FOV_MM = (16.0, 40.0, 40.0)


@dataclass
class BenchmarkOptions:
    """What to run and on which cases.

    Attributes:
        cases: cases per family and section (regions cycle head_neck, chest, abdomen); synthesis
            runs this many cases of every region.
        families: "heldout" (the independent family, the headline numbers) and/or "training"
            (the family the model was trained on, reported as its own section).
        seed_start: case ``i`` uses seeds ``seed_start + 10 i`` ... ``+ 9``.
        sections: from :data:`SECTIONS`.
        fov_mm: field of view (k, j, i) in mm of every case grid.
        noise_levels_hu: denoising noise levels (standard deviation, HU).
        superres_factors: slice-thickness factors for super-resolution (2..6).
        steps: reverse steps per section (missing: the task's default).
        device: "auto", "cpu", "cuda" or "cuda:N" for the model.
        bm4d: run BM4D when the optional ``bm4d`` package is installed.
        nlm: run 3-D non-local means.
        progress: one line per step on stderr.
    """

    cases: int = 5
    families: Sequence[str] = FAMILIES
    seed_start: int = SEED_START
    sections: Sequence[str] = SECTIONS
    fov_mm: Sequence[float] = FOV_MM
    noise_levels_hu: Sequence[float] = NOISE_LEVELS_HU
    superres_factors: Sequence[int] = SUPERRES_FACTORS
    steps: dict = field(default_factory=dict)
    device: str = "auto"
    bm4d: bool = True
    nlm: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.sections = tuple(parse_sections(self.sections))
        self.families = tuple(parse_families(self.families))
        if int(self.cases) < 1:
            raise ValueError("cases must be >= 1")
        if int(self.seed_start) < 10_000:
            raise ValueError("seed_start must be >= 10000: seeds below are used for training phantoms")
        fov = tuple(float(f) for f in self.fov_mm)
        if len(fov) != 3 or min(fov) <= 0:
            raise ValueError(f"fov_mm must be three positive sizes (k, j, i) in mm, got {self.fov_mm}")
        self.fov_mm = fov
        self.noise_levels_hu = tuple(float(n) for n in self.noise_levels_hu)
        if not self.noise_levels_hu or min(self.noise_levels_hu) <= 0 or len(self.noise_levels_hu) > 8:
            raise ValueError("noise_levels_hu must hold 1 to 8 positive levels")
        self.superres_factors = tuple(int(f) for f in self.superres_factors)
        if not self.superres_factors or not all(2 <= f <= 6 for f in self.superres_factors):
            raise ValueError(f"superres_factors must be integers from 2 to 6, got {self.superres_factors}")
        steps = {}
        for key, value in dict(self.steps or {}).items():
            name = SECTION_ALIASES.get(str(key).lower())
            if name is None:
                raise ValueError(f"steps for unknown section {key!r}; sections: {', '.join(SECTIONS)}")
            if int(value) < 1:
                raise ValueError(f"steps must be >= 1, got {value} for {key}")
            steps[name] = int(value)
        self.steps = steps


def _parse_names(values, allowed: Sequence[str], aliases: dict, what: str) -> list[str]:
    if isinstance(values, str):
        values = [v for v in values.split(",") if v.strip()]
    chosen = []
    for v in values:
        name = aliases.get(str(v).strip().lower())
        if name is None:
            raise ValueError(f"unknown benchmark {what} {v!r}; choose from {', '.join(allowed)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"no benchmark {what} selected")
    return [a for a in allowed if a in chosen]


def parse_sections(sections) -> list[str]:
    """Section names from a list or a comma-separated string (aliases such as "synthesize" accepted)."""
    return _parse_names(sections, SECTIONS, SECTION_ALIASES, "section")


def parse_families(families) -> list[str]:
    return _parse_names(families, FAMILIES, {"heldout": "heldout", "held-out": "heldout", "training": "training"},
                        "family")


def parse_steps(items: Optional[Sequence[str]]) -> dict:
    """``["10"]`` -> the same steps for every section; ``["denoise=10", "anomaly=20"]`` -> per section."""
    out: dict = {}
    for item in items or []:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if "=" in part:
                key, value = part.split("=", 1)
                name = SECTION_ALIASES.get(key.strip().lower())
                if name is None:
                    raise ValueError(f"--steps: unknown section {key!r}")
                out[name] = int(value)
            else:
                out.update({s: int(part) for s in SECTIONS})
    return out
