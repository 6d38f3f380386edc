"""One benchmark run: resolve the models, build the cases, run every section, collect rows."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable, Optional

from ..weights import WEIGHTS_NAME, sha256_file
from .cases import Case, case_region, case_seed, clinical_grid, make_case
from .generation import synthesis_case_indices
from .options import (ANOMALY_LESIONS, FAMILY_TITLES, INPLANE_MM, SECTION_TASK, SLICE_MM, BenchmarkOptions)
from .rows import Rows
from .task_facts import controlnet_task


class Context:
    """What the sections share: options, models, the row collector, notes and a case cache."""

    def __init__(self, opts: BenchmarkOptions, base_dir: Path, controlnets: dict, log: Callable[[str], None]):
        self.opts, self.base_dir, self.controlnets, self.log = opts, base_dir, controlnets, log
        self.rows = Rows()
        self.notes: list[str] = []
        self.meta: dict = {}
        self._cases: dict = {}

    def case(self, family: str, i: int, lesions: bool = False) -> Case:
        """Case ``i`` of ``family`` on its clinical grid, healthy or with lesions (same anatomy)."""
        key = (family, i, lesions)
        if key not in self._cases:
            region, seed = case_region(i), case_seed(self.opts.seed_start, i)
            grid = clinical_grid(region, seed, self.opts.fov_mm)
            self._cases[key] = make_case(family, region, seed, grid, ANOMALY_LESIONS if lesions else 0)
        return self._cases[key]

    def params(self, section: str, **extra) -> dict:
        steps = {"steps": self.opts.steps[section]} if section in self.opts.steps else {}
        return {**steps, **extra}

    def run_model(self, section: str, request):
        """``run_task`` for the section's task, with its ControlNet; (result, seconds)."""
        from ..tasks import run_task

        task = SECTION_TASK[section]
        cn_task = controlnet_task(task)
        t0 = time.monotonic()
        result = run_task(task, request, self.base_dir, controlnet=self.controlnets.get(cn_task) if cn_task else None,
                          device=self.opts.device)
        return result, time.monotonic() - t0

    def add(self, family: str, section: str, condition: str, method: str, case: str, n=None, **values) -> None:
        self.rows.add(family, section, condition, method, case, n, **values)


def resolve_controlnet(name, task: str, base_dir: Path) -> tuple[Optional[Path], Optional[str]]:
    """The ControlNet directory for ``task`` ("superres" or "lesion"), or (None, why skipped).

    A ControlNet named by the caller that cannot be used is an error (ValueError); a missing
    or unusable registered default only skips its sections, with the reason."""
    from .. import weights
    from ..checkpoint import read_config, sha256_file

    explicit = name is not None
    what = f"{task} ControlNet"
    if not explicit:
        try:
            name = weights.default_model_id("controlnet", task)
        except (ValueError, OSError) as e:
            return None, f"no {what}: the model registry cannot be read ({e})"
        if name is None:
            return None, f"no {what} given or registered"
    try:
        path = Path(weights.resolve_model(name, kind="controlnet", task=task))
        cfg = read_config(path)
        if cfg.get("kind") != "controlnet" or cfg.get("task") != task:
            raise ValueError(f"{path} is not a {what} (kind {cfg.get('kind')!r}, task {cfg.get('task')!r})")
        want = cfg.get("base_sha256") or ""
        if want and want != sha256_file(Path(base_dir) / "model.safetensors"):
            raise ValueError(f"the {what} in {path} was trained on another base model than {base_dir}")
    except (ValueError, OSError) as e:
        if explicit:
            raise ValueError(f"{what} {name!s}: {e}") from e
        return None, f"default {what} {name!r} not usable: {e}"
    return path, None


def run_benchmark(model=None, *, superres_controlnet=None, lesion_controlnet=None,
                  options: Optional[BenchmarkOptions] = None, log: Optional[Callable[[str], None]] = None,
                  command: str = "") -> dict:
    """Run the benchmark; returns ``{"meta", "rows", "notes", "captions"}`` (strict JSON after
    :func:`report.to_jsonable`).

    Args:
        model: foundation model directory or registry id (None: the registry's default).
        superres_controlnet / lesion_controlnet: ControlNet directory or id (None: the
            registered default; its sections are skipped with a note when there is none).
        options: :class:`BenchmarkOptions`.
        log: progress lines (default: stderr when ``options.progress``).
        command: the command line, recorded in the result.
    """
    from ..tasks.common import resolve_model_dir
    from .detection import run_anomaly
    from .generation import CAPTIONS as GENERATION_CAPTIONS
    from .generation import run_inpaint, run_lesion, run_synthesis
    from .restoration import CAPTIONS as RESTORATION_CAPTIONS
    from .restoration import run_denoise, run_superres
    from .detection import CAPTIONS as DETECTION_CAPTIONS

    opts = options or BenchmarkOptions()
    if log is None:
        log = (lambda s: print(f"[benchmark] {s}", file=sys.stderr, flush=True)) if opts.progress else (lambda s: None)
    started = time.monotonic()
    base_dir = resolve_model_dir(model, kind="base")
    controlnets: dict = {}
    notes = []
    needs = {"superres": "superres" in opts.sections, "lesion": bool({"inpaint", "lesion"} & set(opts.sections))}
    for task, given in (("superres", superres_controlnet), ("lesion", lesion_controlnet)):
        if needs[task]:
            controlnets[task], why = resolve_controlnet(given, task, base_dir)
            if why:
                sections = "super-resolution" if task == "superres" else "inpainting and lesion generation"
                notes.append(f"{sections} skipped: {why} (pass --{task}-controlnet DIR|id)")
    ctx = Context(opts, base_dir, controlnets, log)
    ctx.notes.extend(notes)
    ctx.meta = {
        "command": command, "model": str(Path(base_dir).resolve()),
        "model_sha256": sha256_file(Path(base_dir) / WEIGHTS_NAME),
        "controlnets": {k: str(v.resolve()) if v else None for k, v in controlnets.items()},
        "cases": int(opts.cases), "families": list(opts.families), "seed_start": int(opts.seed_start),
        "sections": list(opts.sections), "fov_mm": list(opts.fov_mm), "inplane_mm": list(INPLANE_MM),
        "slice_mm": list(SLICE_MM), "noise_levels_hu": list(opts.noise_levels_hu),
        "superres_factors": list(opts.superres_factors), "device": opts.device,
        "steps": {s: opts.steps.get(s, "task default") for s in opts.sections},
        "regions": [case_region(i) for i in range(opts.cases)],
        "synthesis_regions": [case_region(i) for i in synthesis_case_indices(opts.cases)],
    }
    runners = {"denoise": run_denoise, "anomaly": run_anomaly, "synthesis": run_synthesis, "superres": run_superres,
               "inpaint": run_inpaint, "lesion": run_lesion}
    log(f"model {base_dir}; {opts.cases} case(s) per section (synthesis: per region); "
        f"families {', '.join(opts.families)}; sections {', '.join(opts.sections)}")
    for family in opts.families:
        for section in opts.sections:
            cn = controlnet_task(SECTION_TASK[section])
            if cn is not None and controlnets.get(cn) is None:
                continue
            t0 = time.monotonic()
            runners[section](ctx, family)
            log(f"{section} ({FAMILY_TITLES[family]}) done in {time.monotonic() - t0:.1f} s")
    ctx.meta["seconds_total"] = time.monotonic() - started
    captions = {**RESTORATION_CAPTIONS, **DETECTION_CAPTIONS, **GENERATION_CAPTIONS}
    return {"meta": ctx.meta, "rows": ctx.rows.records(), "notes": ctx.notes,
            "captions": {s: captions[s] for s in opts.sections}}
