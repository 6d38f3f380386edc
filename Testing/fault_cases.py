"""The fault cases of the command line: each one command line, what it must give, and the
setup that makes its odd input (run by :mod:`fault_harness`)."""

from __future__ import annotations

import json
import os
import shutil
import signal as _signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np


ROOT = Path(__file__).resolve().parent.parent
OK = "clear error"
CLASSES = ("clear error", "unclear or misleading error", "traceback shown to the user", "silent wrong result",
           "silently accepted odd value", "runaway memory or run time", "input file overwritten",
           "partial output left behind", "success as expected")
INPUT_FILES = ("ph.nii.gz", "m.nii.gz", "lab.nii.gz", "lab.labels.json")
MEMORY_LIMIT_BYTES = 8 * 1024 ** 3  # address space of a case: a runaway grid fails instead of swapping


@dataclass(frozen=True)
class Case:
    """One command line and what it must give.

    Attributes:
        id: short name.
        argv: arguments after ``meddiff-fm``; ``{model}``, ``{cn_lesion}``, ``{cn_superres}`` and
            ``{sys}`` (a folder no file can be created in) are filled in.
        code: the exit code expected.
        words: lower-case words the one-line message must contain.
        setup: prepares the case folder (odd inputs, damaged models); its files count as inputs.
        signal: (signal number, "start" | "run" | "write"): sent at start-up (0.3 s), once the
            progress bar shows, or once a temporary output file exists.
        outputs: for a success: files that must appear, finite.
        accepted: what an exit 0 counts as when an error was expected.
        inprocess: the behaviour is the library's (model loading): the test suite runs it with
            ``cli.main`` in its own process, where torch is already imported; the script runs
            every case as a subprocess.
    """

    id: str
    argv: tuple
    code: int
    words: tuple = ()
    setup: Optional[Callable[[Path, dict], None]] = None
    signal: Optional[tuple] = None
    outputs: tuple = ()
    accepted: str = "silently accepted odd value"
    inprocess: bool = False


# ------------------------------------------------------------------------------- setups
def _rewrite(path: Path, *, spacing=None, array=None, dtype=None) -> None:
    """Rewrite a NIfTI file with another spacing (mm, all axes) or array, keeping the rest."""
    import nibabel as nib

    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj) if array is None else array
    affine = img.affine.copy()
    if spacing is not None:
        affine[:3, :3] = np.diag([float(spacing)] * 3)
    out = nib.Nifti1Image(np.asarray(data, dtype=dtype or data.dtype), affine)
    nib.save(out, str(path))


def spacing_setup(mm: float) -> Callable:
    def setup(d: Path, shared: dict) -> None:
        _rewrite(d / "ph.nii.gz", spacing=mm)
    return setup


def large_grid(d: Path, shared: dict) -> None:
    """The phantom tiled to 40 x 64 x 64 voxels of 20 mm: 0.8 x 1.3 x 1.3 m, 1.3 billion
    voxels on a 1 mm model grid (about 84 GB)."""
    import nibabel as nib

    a = np.asanyarray(nib.load(str(d / "ph.nii.gz")).dataobj).astype(np.float32)
    reps = [int(np.ceil(n / s)) for n, s in zip((64, 64, 40), a.shape)]
    _rewrite(d / "ph.nii.gz", array=np.tile(a, reps)[:64, :64, :40], spacing=20.0)


def copy_as(src: str, dst: str) -> Callable:
    def setup(d: Path, shared: dict) -> None:
        shutil.copyfile(d / src, d / dst)
    return setup


def folder(name: str) -> Callable:
    def setup(d: Path, shared: dict) -> None:
        (d / name).mkdir()
    return setup


def link(name: str, target: str) -> Callable:
    def setup(d: Path, shared: dict) -> None:
        os.symlink(target, d / name)
    return setup


def mask_values(kind: str) -> Callable:
    def setup(d: Path, shared: dict) -> None:
        import nibabel as nib

        m = np.asanyarray(nib.load(str(d / "m.nii.gz")).dataobj) > 0
        if kind == "half":
            _rewrite(d / "m.nii.gz", array=m * np.float32(0.5), dtype=np.float32)
        elif kind == "nan":
            _rewrite(d / "m.nii.gz", array=np.where(m, np.nan, 0).astype(np.float32), dtype=np.float32)
        elif kind == "empty":
            _rewrite(d / "m.nii.gz", array=np.zeros(m.shape, np.uint8), dtype=np.uint8)
    return setup


def image_values(kind: str) -> Callable:
    def setup(d: Path, shared: dict) -> None:
        import nibabel as nib

        a = np.asanyarray(nib.load(str(d / "ph.nii.gz")).dataobj).astype(np.float32)
        if kind == "nan":
            a[0, 0, 0] = np.nan
            _rewrite(d / "ph.nii.gz", array=a)
        elif kind == "air":
            _rewrite(d / "ph.nii.gz", array=np.full(a.shape, -1000.0, np.float32))
        elif kind == "complex":
            _rewrite(d / "ph.nii.gz", array=(a + 1j * a).astype(np.complex64), dtype=np.complex64)
        elif kind == "2d":
            _rewrite(d / "ph.nii.gz", array=a[:, :, 0])
        elif kind == "corrupt":
            raw = (d / "ph.nii.gz").read_bytes()
            (d / "ph.nii.gz").write_bytes(raw[: len(raw) // 3])
    return setup


def model_copy(edit: Optional[Callable[[dict], None]] = None, source: str = "model", tensors: Optional[str] = None):
    """A copy of a shared model folder as ``bad_model/`` with its config edited or its
    weights damaged ("nan": one tensor's bytes set to NaN; "truncate": the last 100 bytes cut)."""

    def setup(d: Path, shared: dict) -> None:
        dst = d / "bad_model"
        shutil.copytree(shared[source], dst)
        if edit is not None:
            cfg = json.loads((dst / "config.json").read_text(encoding="utf-8"))
            edit(cfg)
            (dst / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        weights = dst / "model.safetensors"
        if tensors == "truncate":
            raw = weights.read_bytes()
            weights.write_bytes(raw[:-100])
        elif tensors == "nan":
            raw = bytearray(weights.read_bytes())
            (n,) = np.frombuffer(bytes(raw[:8]), "<u8")
            header = json.loads(bytes(raw[8:8 + int(n)]))
            name, info = next((k, v) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32"
                              and v["data_offsets"][1] - v["data_offsets"][0] >= 64)
            start = 8 + int(n) + info["data_offsets"][0]
            raw[start:start + 64] = np.full(16, np.nan, np.float32).tobytes()
            weights.write_bytes(bytes(raw))
    return setup


def drop(*keys: str, inside: Optional[str] = None) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        target = cfg[inside] if inside else cfg
        for k in keys:
            target.pop(k, None)
    return edit


def put(key: str, value) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        cfg[key] = value
    return edit


# ------------------------------------------------------------------------------- the cases
M = ("--model", "{model}", "--device", "cpu", "--quiet")
D = ("denoise", "ph.nii.gz") + M
A = ("anomaly", "ph.nii.gz") + M
L = ("lesion", "ph.nii.gz", "--mask", "m.nii.gz", "--controlnet", "{cn_lesion}") + M
S = ("superres", "ph.nii.gz", "--controlnet", "{cn_superres}") + M
Y = ("synthesize", "--region", "abdomen") + M
NAN = "silent wrong result"

CASES: tuple[Case, ...] = (
    # 1. inputs overwritten
    Case("output-is-input", D + ("-o", "ph.nii.gz"), 2, ("input",)),
    Case("output-is-mask", L + ("-o", "m.nii.gz"), 2, ("mask",)),
    Case("side-output-is-input", ("anomaly", "x_reconstruction.nii.gz") + M + ("-o", "x.nii.gz"), 2,
         ("reconstruction", "input"), setup=copy_as("ph.nii.gz", "x_reconstruction.nii.gz")),
    Case("output-is-anatomy", D + ("--anatomy", "lab.nii.gz", "-o", "lab.nii.gz"), 2, ("anatomy",)),
    Case("output-links-to-input", D + ("-o", "alias.nii.gz"), 2, ("input",), setup=link("alias.nii.gz", "ph.nii.gz")),
    Case("output-is-folder", D + ("-o", "out.nii.gz"), 2, ("folder",), setup=folder("out.nii.gz")),
    Case("side-output-is-folder", A + ("-o", "out.nii.gz"), 2, ("folder", "reconstruction"),
         setup=folder("out_reconstruction.nii.gz")),
    Case("side-outputs-collide", A + ("-o", "out.nii.gz"), 2, ("same file",),
         setup=link("out_anomaly.nii.gz", "out_reconstruction.nii.gz")),
    Case("output-unknown-extension", D + ("-o", "out.png"), 2, ("extension", "out.png")),
    Case("output-folder-missing", D + ("-o", "nowhere/out.nii.gz"), 2, ("does not exist", "nowhere")),
    Case("output-folder-not-writable", D + ("-o", "{readonly}/out.nii.gz"), 2, ("not writable",)),
    # 2. NaN parameters and weights
    Case("strength-nan", D + ("--strength", "nan"), 2, ("--strength", "finite"), accepted=NAN),
    Case("lam-nan", D + ("--lam", "nan"), 2, ("--lam", "finite"), accepted=NAN),
    Case("control-scale-nan", S + ("--control-scale", "nan"), 2, ("--control-scale", "finite"), accepted=NAN),
    Case("guidance-scale-nan", Y + ("--guidance-scale", "nan"), 2, ("--guidance-scale", "finite"), accepted=NAN),
    Case("threshold-nan", A + ("--threshold", "nan"), 2, ("--threshold", "finite"), accepted=NAN),
    Case("weights-nan", ("denoise", "ph.nii.gz", "--model", "bad_model", "--device", "cpu", "--quiet"), 2,
         ("nan", "model.safetensors"), setup=model_copy(tensors="nan"), accepted=NAN, inprocess=True),
    Case("weights-truncated", ("denoise", "ph.nii.gz", "--model", "bad_model", "--device", "cpu", "--quiet"), 2,
         ("truncated", "model.safetensors"), setup=model_copy(tensors="truncate")),
    # 3. signals (start-up, during the run, during the write)
    Case("sigint-at-start", D, 130, ("interrupted", "nothing written"), signal=(_signal.SIGINT, "start")),
    Case("sigterm-at-start", D, 143, ("interrupted", "nothing written"), signal=(_signal.SIGTERM, "start")),
    Case("sigint-during-run", ("synthesize", "--region", "abdomen", "--shape", "32", "32", "32", "--spacing", "1",
                               "1", "1", "--steps", "50", "--model", "{model}", "--device", "cpu", "-o", "s.nii.gz"),
         130, ("interrupted", "nothing written"), signal=(_signal.SIGINT, "run")),
    Case("sighup-during-run", ("synthesize", "--region", "abdomen", "--shape", "32", "32", "32", "--spacing", "1",
                               "1", "1", "--steps", "50", "--model", "{model}", "--device", "cpu", "-o", "s.nii.gz"),
         129, ("interrupted", "nothing written"), signal=(_signal.SIGHUP, "run")),
    Case("sigterm-during-write", ("phantom", "--shape", "32", "128", "128", "--spacing", "1", "1", "1", "-o",
                                  "big.nii.gz"), 143, ("interrupted", "nothing written"),
         signal=(_signal.SIGTERM, "write")),
    Case("sigint-during-write", ("phantom", "--shape", "32", "128", "128", "--spacing", "1", "1", "1", "-o",
                                 "big.nii.gz"), 130, ("interrupted", "nothing written"),
         signal=(_signal.SIGINT, "write")),
    # 4. grids and voxel sizes
    Case("spacing-50mm", D, 2, ("implausible", "50"), setup=spacing_setup(50.0)),
    Case("spacing-0.01mm", D, 2, ("implausible", "0.01"), setup=spacing_setup(0.01)),
    Case("grid-too-large", D, 2, ("million voxels", "memory"), setup=large_grid, inprocess=True),
    # 5. config.json
    Case("config-no-spacing", ("denoise", "ph.nii.gz", "--model", "bad_model", "--device", "cpu", "--quiet"), 2,
         ("spacing", "config.json"), setup=model_copy(drop("spacing_mm", "spacing_range_mm"))),
    Case("config-no-window", ("denoise", "ph.nii.gz", "--model", "bad_model", "--device", "cpu", "--quiet"), 2,
         ("window", "config.json"), setup=model_copy(drop("window"))),
    Case("config-window-text", ("denoise", "ph.nii.gz", "--model", "bad_model", "--device", "cpu", "--quiet"), 2,
         ("window", "big"), setup=model_copy(put("window", "big"))),
    Case("controlnet-no-task", L[:5] + ("bad_model",) + M, 2, ("task", "config.json"),
         setup=model_copy(drop("task"), source="cn_lesion")),
    Case("controlnet-no-channels", L[:5] + ("bad_model",) + M, 2, ("control_channels", "config.json"),
         setup=model_copy(drop("control_channels"), source="cn_lesion")),
    Case("controlnet-no-base", L[:5] + ("bad_model",) + M, 2, ("base", "config.json"),
         setup=model_copy(drop("base"), source="cn_lesion")),
    Case("controlnet-no-base-sha256", L[:5] + ("bad_model",) + M, 2, ("base_sha256", "config.json"),
         setup=model_copy(drop("base_sha256"), source="cn_lesion")),
    # 6. parameters out of bounds
    Case("window-3", D + ("--window", "3"), 2, ("window", "3")),
    Case("window-negative", D + ("--window", "-8"), 2, ("window", "-8")),
    Case("steps-100000", D + ("--steps", "100000"), 2, ("steps", "1000")),
    Case("lam-negative", D + ("--lam", "-1"), 2, ("--lam", "-1")),
    Case("smoothing-negative", A + ("--smoothing-mm", "-1"), 2, ("--smoothing-mm", "-1")),
    Case("margin-negative", L + ("--margin-mm", "-5"), 2, ("--margin-mm", "-5")),
    Case("refine-fraction-2", A + ("--refine-fraction", "2"), 2, ("--refine-fraction", "2")),
    Case("seed-negative", D + ("--seed", "-1"), 2, ("--seed", "-1")),
    Case("lesion-noise-fraction-0", L + ("--noise-fraction", "0"), 2, ("--noise-fraction", "0")),
    Case("synth-spacing-negative", Y + ("--shape", "8", "8", "8", "--spacing", "-4", "4", "4"), 2,
         ("--spacing", "-4")),
    Case("synth-shape-fraction", Y + ("--shape", "8.5", "8", "8"), 2, ("--shape", "8.5")),
    Case("device-gpu", D[:2] + ("--model", "{model}", "--device", "gpu", "--quiet"), 2, ("device", "gpu")),
    Case("device-tpu", D[:2] + ("--model", "{model}", "--device", "tpu", "--quiet"), 2, ("device", "tpu")),
    Case("device-cuda9", D[:2] + ("--model", "{model}", "--device", "cuda:9", "--quiet"), 2, ("cuda:9",), inprocess=True),
    # 7./8. inputs
    Case("image-complex", D, 2, ("complex",), setup=image_values("complex")),
    Case("mask-half-accepted", L + ("--steps", "1", "-o", "les.nii.gz"), 0, setup=mask_values("half"),
         outputs=("les.nii.gz", "les_lesion.nii.gz"), inprocess=True),
    Case("anomaly-no-body", A, 2, ("no body",), setup=image_values("air")),
    # the rest of the classes
    Case("input-missing", ("denoise", "nope.nii.gz") + M, 2, ("nope.nii.gz",)),
    Case("input-corrupt", D, 2, ("ph.nii.gz", "corrupt"), setup=image_values("corrupt")),
    Case("input-2d", D, 2, ("3-d",), setup=image_values("2d")),
    Case("input-nan", D, 2, ("nan",), setup=image_values("nan")),
    Case("input-wrong-extension", ("denoise", "lab.labels.json") + M, 2, ("extension", ".json")),
    Case("mask-missing", L[:3] + ("gone.nii.gz",) + L[4:], 2, ("gone.nii.gz",)),
    Case("mask-nan", L, 2, ("mask", "nan"), setup=mask_values("nan")),
    Case("mask-empty", L + ("--steps", "1"), 2, ("mask", "empty"), setup=mask_values("empty")),
    Case("region-unknown", D + ("--region", "mars"), 2, ("mars", "chest")),
    Case("model-missing", ("denoise", "ph.nii.gz", "--model", "no_model/", "--device", "cpu", "--quiet"), 2,
         ("no_model",)),
    Case("model-pickle", ("denoise", "ph.nii.gz", "--model", "bad_model", "--device", "cpu", "--quiet"), 2,
         ("pickle",), setup=lambda d, s: (model_copy()(d, s), (d / "bad_model" / "evil.pt").write_bytes(b"x"))),
    Case("controlnet-wrong-task", ("superres", "ph.nii.gz", "--controlnet", "{cn_lesion}") + M, 2,
         ("lesion", "superres")),
    Case("steps-text", D + ("--steps", "many"), 2, ("--steps", "many")),
    Case("method-unknown", D + ("--method", "euler"), 2, ("--method", "euler")),
    Case("overlap-1", D + ("--overlap", "1"), 2, ("--overlap", "0.9")),
    Case("unknown-option", D + ("--frobnicate", "3"), 2, ("--frobnicate",)),
    Case("phantom-spacing-zero", ("phantom", "--spacing", "0", "4", "4", "-o", "p.nii.gz"), 2, ("--spacing", "0")),
    Case("train-steps-zero", ("train", "--preset", "tiny", "--phantoms", "1", "--steps", "0", "--out", "run"), 2,
         ("--steps", "0")),
    Case("train-lr-nan", ("train", "--preset", "tiny", "--phantoms", "1", "--lr", "nan", "--out", "run"), 2,
         ("--lr", "finite"), accepted=NAN),
    # success: finite outputs, the umask respected, nothing else left
    Case("denoise-ok", D + ("--steps", "1", "-o", "den.nii.gz"), 0, outputs=("den.nii.gz",)),
)
