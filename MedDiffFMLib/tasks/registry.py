"""The six tasks, each described once: name, label, parameters with bounds, inputs and outputs.

Everything that lists tasks reads this module: ``run_task``, the command line, the worker,
the Slicer module's tables, its node logic and the benchmark. It imports neither torch nor
MONAI, so the Slicer module and the worker can read it before torch is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

from ..anatomy import CONTRAST_PHASES

__all__ = ["ParamSpec", "OutputSpec", "TaskSpec", "TASKS", "COMMON_PARAMS", "task_spec", "check_params"]


@dataclass(frozen=True)
class ParamSpec:
    """One task parameter.

    Attributes:
        type: int, float, str or bool (the element type when ``length`` is set).
        default: the value used when the parameter is not given; None means "automatic"
            (the help says what that is).
        help: one line for the command line and the UI.
        choices: the allowed values of a str parameter.
        minimum, maximum: inclusive bounds of a number (each element of a tuple).
        exclusive_minimum: the minimum itself is not allowed (e.g. a strength must be > 0).
        length: a tuple of exactly this many elements (e.g. 3 for (k, j, i)).
        unit: shown after numbers in the UI ("mm", "HU").
    """

    type: type
    default: Any
    help: str
    choices: Optional[tuple] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: bool = False
    length: Optional[int] = None
    unit: str = ""

    def check(self, name: str, value: Any) -> Any:
        """``value`` coerced to the parameter's type and checked against its bounds.

        Raises:
            ValueError: one line naming the parameter, the value and what is allowed.
        """
        if value is None:
            if self.default is None:
                return None
            raise ValueError(f"parameter {name!r} needs a value")
        if self.length is not None:
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise ValueError(f"parameter {name!r} must be {self.length} numbers, got {value!r}")
            items = list(value)
            if len(items) != self.length:
                raise ValueError(f"parameter {name!r} must be {self.length} numbers, got {len(items)}: {value!r}")
            return tuple(self._scalar(name, v) for v in items)
        return self._scalar(name, value)

    def _scalar(self, name: str, value: Any) -> Any:
        kind = self.type
        if kind is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                    raise ValueError(f"parameter {name!r} must be true or false, got {value!r}")
                return low in ("1", "true", "yes", "on")
            if isinstance(value, (bool, int)) and value in (0, 1):
                return bool(value)
            raise ValueError(f"parameter {name!r} must be true or false, got {value!r}")
        if kind is str:
            if not isinstance(value, str):
                raise ValueError(f"parameter {name!r} must be text, got {value!r}")
            if self.choices is not None and value not in self.choices:
                raise ValueError(f"parameter {name!r} must be one of {', '.join(self.choices)}; got {value!r}")
            return value
        if isinstance(value, bool):
            raise ValueError(f"parameter {name!r} must be a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"parameter {name!r} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"parameter {name!r} must be a finite number, got {value!r}")
        if kind is int:
            if number != round(number):
                raise ValueError(f"parameter {name!r} must be a whole number, got {value!r}")
            number = int(round(number))
        if self.minimum is not None:
            too_small = number <= self.minimum if self.exclusive_minimum else number < self.minimum
            if too_small:
                rel = ">" if self.exclusive_minimum else ">="
                raise ValueError(f"parameter {name!r} must be {rel} {_fmt(self.minimum)}, got {value!r}")
        if self.maximum is not None and number > self.maximum:
            raise ValueError(f"parameter {name!r} must be <= {_fmt(self.maximum)}, got {value!r}")
        return number


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class OutputSpec:
    """One output of a task.

    Attributes:
        name: the key in ``TaskResult.volumes`` or ``TaskResult.segmentations``.
        label: words for node names and file suffixes shown to users.
        kind: "volume" or "segmentation".
        primary: the output the UI's output selector refers to (one per kind at most).
    """

    name: str
    label: str
    kind: str
    primary: bool = False


@dataclass(frozen=True)
class TaskSpec:
    """One user task.

    Attributes:
        name: the identifier (``run_task`` name, CLI command).
        label: title-case words for menus.
        description: one line for help texts.
        module: the ``MedDiffFMLib.tasks`` module that runs it.
        controlnet: the ControlNet task it needs ("superres", "lesion"), or None.
        needs_image: an input CT is required (synthesis can work from anatomy alone).
        needs_mask: a mask is required.
        accepts_anatomy: an anatomy label map may condition it.
        params: name -> :class:`ParamSpec`.
        outputs: what it returns.
    """

    name: str
    label: str
    description: str
    module: str
    controlnet: Optional[str]
    needs_image: bool
    needs_mask: bool
    accepts_anatomy: bool
    params: Mapping[str, ParamSpec]
    outputs: tuple[OutputSpec, ...] = field(default_factory=tuple)

    @property
    def primary_volume(self) -> Optional[str]:
        return next((o.name for o in self.outputs if o.kind == "volume" and o.primary), None)

    @property
    def primary_segmentation(self) -> Optional[str]:
        return next((o.name for o in self.outputs if o.kind == "segmentation" and o.primary), None)

    def output(self, name: str, kind: str) -> OutputSpec:
        for o in self.outputs:
            if o.name == name and o.kind == kind:
                return o
        raise KeyError(f"task {self.name!r} has no {kind} output {name!r}")

    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.params.items()}


# Parameters every sampling task takes.
COMMON_PARAMS: dict[str, ParamSpec] = {
    "steps": ParamSpec(int, 20, "number of reverse diffusion steps actually run", minimum=1, maximum=1000),
    "seed": ParamSpec(int, 0, "random seed; the same seed gives the same result on the same device",
                      minimum=0, maximum=2**31 - 1),
    "method": ParamSpec(str, "ddim", "reverse step: ddim (deterministic) or ddpm (ancestral)", ("ddim", "ddpm")),
    "window": ParamSpec(int, 0, "window edge in voxels (0 = the model's own; else 8 to 512)", minimum=0, maximum=512),
    "overlap": ParamSpec(float, 0.25, "overlap between neighbouring windows, in [0, 0.9]", minimum=0.0, maximum=0.9),
    "batch_size": ParamSpec(int, 4, "windows per network call (memory bound)", minimum=1, maximum=256),
    "precision": ParamSpec(str, "auto", "auto (bf16 on GPUs that have it, fp32 on the CPU), fp32, bf16 (also on "
                                        "the CPU, with channels_last_3d) or fp16 (GPU)",
                           ("auto", "fp32", "bf16", "fp16")),
    "mirrors": ParamSpec(int, 1, "average every network estimate over this many mirror images of the volume "
                                 "(1, 2, 4 or 8; each costs one more pass)", minimum=1, maximum=8),
    "compile": ParamSpec(bool, False, "compile the network with torch.compile (slow first step, faster after)"),
    "backend": ParamSpec(str, "torch", "network runtime: torch, or onnx (onnxruntime; its CUDA provider with "
                                       "onnxruntime-gpu)", ("torch", "onnx")),
}


def _params(**extra: ParamSpec) -> dict[str, ParamSpec]:
    return {**COMMON_PARAMS, **extra}


_LOCAL = {
    "margin_mm": ParamSpec(float, 16.0, "context around the mask that the sampler sees", minimum=0.0,
                           maximum=200.0, unit="mm"),
    "match_noise": ParamSpec(bool, True, "add the image's own noise level to the new content, so that it is not "
                                         "smoother than the tissue around it"),
}

TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec(
        "denoise", "Denoising", "zero-shot denoising (DiffPIR with the noise level estimated from the image)",
        module="denoise", controlnet=None, needs_image=True, needs_mask=False, accepts_anatomy=True,
        params=_params(
            steps=ParamSpec(int, 1, "reverse steps from the step that matches the noise level (one step gives "
                                    "the MMSE-like estimate, as good as 2 on held-out phantoms at half the cost; "
                                    "more give sharper texture)",
                            minimum=1, maximum=1000),
            noise_level=ParamSpec(float, 0.0, "noise standard deviation (0 = estimate it from the image)",
                                  minimum=0.0, maximum=1000.0, unit="HU"),
            strength=ParamSpec(float, 1.0, "multiplies the noise level: > 1 smooths more, < 1 less",
                               minimum=0.0, exclusive_minimum=True, maximum=10.0),
            lam=ParamSpec(float, 40.0, "DiffPIR lambda: weight of the prior against the data (training-family "
                                       "phantoms at 25 HU: 40 gave +0.03 to +0.11 dB PSNR over 10)",
                          minimum=0.0, exclusive_minimum=True, maximum=1e4),
            mirrors=replace(COMMON_PARAMS["mirrors"], default=4,
                            help=COMMON_PARAMS["mirrors"].help[:-1] + "; 4 gained 0.1-0.4 dB PSNR on held-out "
                                 "phantoms, 8 little more)"),
        ),
        outputs=(OutputSpec("denoised", "denoised", "volume", primary=True),),
    ),
    TaskSpec(
        "anomaly", "Anomaly detection",
        "zero-shot anomaly detection: coarse reconstruction from a large t, refined at the input's resolution",
        module="anomaly", controlnet=None, needs_image=True, needs_mask=False, accepts_anatomy=True,
        params=_params(
            noise_fraction=ParamSpec(float, 0.4, "diffuse to this fraction of T before reconstructing (the "
                                                 "paper: 0.95, for a model trained far longer)", minimum=0.0,
                                     exclusive_minimum=True, maximum=1.0),
            refine_fraction=ParamSpec(float, 0.2, "the coarse reconstruction is refined at the input's "
                                                  "resolution from this fraction of T (0 = no refinement)",
                                      minimum=0.0, maximum=1.0),
            reconstructions=ParamSpec(int, 3, "average the reconstructions of this many seeds (each is one "
                                              "posterior sample: the mean is a steadier healthy estimate)",
                                      minimum=1, maximum=16),
            smoothing_mm=ParamSpec(float, 2.0, "Gaussian smoothing (sigma) of the difference map",
                                   minimum=0.0, maximum=50.0, unit="mm"),
            organ_check=ParamSpec(bool, True, "with an anatomy label map: flag only what also differs from its "
                                              "organ's median HU (the map is capped by that deviation's z-score), "
                                              "so healthy anatomy the model misreproduces is not flagged"),
            min_spread_hu=ParamSpec(float, 5.0, "the least spread (HU) of a tissue's differences that its z-score "
                                                "divides by, so that errors of a few HU are never evidence",
                                    minimum=0.0, maximum=100.0, unit="HU"),
            threshold=ParamSpec(float, 4.0, "anomaly-map threshold: robust z-score within the voxel's tissue group",
                                minimum=0.0, exclusive_minimum=True, maximum=1000.0),
            min_size_mm3=ParamSpec(float, 20.0, "drop mask components smaller than this volume",
                                   minimum=0.0, maximum=1e6, unit="mm^3"),
            opening_mm=ParamSpec(float, 2.5, "without an anatomy label map: drop the parts of the mask thinner "
                                             "than about twice this (an opening by a ball of this radius; 0 = none)",
                                 minimum=0.0, maximum=50.0, unit="mm"),
        ),
        outputs=(OutputSpec("anomaly_map", "anomaly map", "volume", primary=True),
                 OutputSpec("reconstruction", "anomaly reconstruction", "volume"),
                 OutputSpec("anomaly", "anomaly", "segmentation", primary=True)),
    ),
    TaskSpec(
        "synthesize", "Synthesis", "synthesise a CT from a region and an optional anatomy label map",
        module="synthesize", controlnet=None, needs_image=False, needs_mask=False, accepts_anatomy=True,
        params=_params(
            guidance_scale=ParamSpec(float, 1.0, "classifier-free guidance scale (1 = off)", minimum=0.0,
                                     maximum=20.0),
            multilevel=ParamSpec(bool, True, "coarse sample of the whole volume first, then refinement at the "
                                             "output's resolution"),
            refine_fraction=ParamSpec(float, 0.6, "fraction of T at which the refinement starts",
                                      minimum=0.0, exclusive_minimum=True, maximum=1.0),
            layout_start=ParamSpec(float, 0.7, "with anatomy: start from the label map's layout (each tissue "
                                               "group at its typical HU) noised to this fraction of T; 1 = from "
                                               "pure noise", minimum=0.0, exclusive_minimum=True, maximum=1.0),
            contrast_phase=ParamSpec(str, "portal_venous", "with anatomy: the contrast phase of that layout",
                                     CONTRAST_PHASES),
            shape=ParamSpec(int, None, "(k, j, i) voxels when neither anatomy nor image gives the grid",
                            minimum=1, maximum=2048, length=3),
            spacing=ParamSpec(float, None, "(k, j, i) voxel size when neither anatomy nor image gives the grid",
                              minimum=0.05, maximum=20.0, length=3, unit="mm"),
        ),
        outputs=(OutputSpec("synthetic", "synthetic", "volume", primary=True),),
    ),
    TaskSpec(
        "superres", "Super-resolution",
        "thinner slices with the super-resolution ControlNet; the in-plane grid and the slab means are kept",
        module="superres", controlnet="superres", needs_image=True, needs_mask=False, accepts_anatomy=True,
        params=_params(
            factor=ParamSpec(int, None, "new slices per input slice along k, 2 to 6 (default: the slice "
                                        "spacing over the in-plane spacing, rounded)", minimum=2, maximum=6),
            noise_fraction=ParamSpec(float, 0.5, "start from the interpolated image noised to this fraction of T",
                                     minimum=0.0, exclusive_minimum=True, maximum=1.0),
            control_scale=ParamSpec(float, 1.0, "ControlNet conditioning scale", minimum=0.0, maximum=10.0),
            self_check=ParamSpec(bool, True, "measure the model against interpolation on the input itself "
                                             "(one more, thicker level) and keep only as much of its detail "
                                             "as that check supports"),
        ),
        outputs=(OutputSpec("superres", "super-resolution", "volume", primary=True),),
    ),
    TaskSpec(
        "lesion", "Lesion generation", "generate a lesion inside a mask with the lesion ControlNet",
        module="lesion", controlnet="lesion", needs_image=True, needs_mask=True, accepts_anatomy=True,
        params=_params(
            noise_fraction=ParamSpec(float, 1.0, "start from the image noised to this fraction of T (1 = pure "
                                                 "noise inside the box)", minimum=0.05, maximum=1.0),
            control_scale=ParamSpec(float, 1.0, "ControlNet conditioning scale", minimum=0.0, maximum=10.0),
            **_LOCAL,
        ),
        outputs=(OutputSpec("lesion", "lesion", "volume", primary=True),
                 OutputSpec("lesion", "lesion", "segmentation", primary=True)),
    ),
    TaskSpec(
        "inpaint", "Lesion inpainting", "RePaint inpainting inside a mask (lesion or healthy tissue)",
        module="inpaint", controlnet="lesion", needs_image=True, needs_mask=True, accepts_anatomy=True,
        params=_params(
            method=ParamSpec(str, "ddpm", "reverse step: ddpm (RePaint's) or ddim", ("ddim", "ddpm")),
            jump_length=ParamSpec(int, 3, "RePaint: steps re-noised per jump", minimum=1, maximum=100),
            jump_n_sample=ParamSpec(int, 2, "RePaint: how often each jump is taken (1 = no resampling)",
                                    minimum=1, maximum=20),
            content=ParamSpec(str, "lesion", "what to paint inside the mask", ("lesion", "healthy")),
            **_LOCAL,
        ),
        outputs=(OutputSpec("inpainted", "inpainted", "volume", primary=True),
                 OutputSpec("inpainted_region", "inpainted region", "segmentation", primary=True)),
    ),
)}


def task_spec(name: str) -> TaskSpec:
    """The spec of task ``name``; a one-line error listing the tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def check_params(task: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in, types coerced, bounds checked, unknown keys refused (before any work)."""
    specs = task_spec(task).params
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping of name -> value, got {type(params).__name__}")
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for task {task!r}; known: {', '.join(sorted(specs))}")
    out = {name: spec.check(name, params.get(name, spec.default)) for name, spec in specs.items()}
    if out.get("window", 0) not in (0,) and out["window"] < 8:
        raise ValueError(f"parameter 'window' must be 0 (the model's own) or 8 to 512, got {out['window']}")
    if out.get("mirrors", 1) not in (1, 2, 4, 8):
        raise ValueError(f"parameter 'mirrors' must be 1, 2, 4 or 8, got {out['mirrors']}")
    return out
