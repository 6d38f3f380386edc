"""Fault cases for the command line, tried the way a hostile new user would.

Each :class:`Case` is one ``meddiff-fm`` command line run as a subprocess in its own folder,
which holds a small phantom (``ph.nii.gz``), its lesion mask (``m.nii.gz``) and its label
map (``lab.nii.gz`` + ``lab.labels.json``). :func:`run_case` records the exit code, stderr,
the files that appeared and the inputs whose sha256 changed; :func:`verdict` sorts the
outcome into the classes of the reliability issue ("clear error", "traceback shown to the
user", "input file overwritten", ...). ``Testing/test_faults_cli.py`` asserts that every case
gets a clear error (or succeeds with finite outputs); run as a script, this module prints the
counts per class for any checkout (``--python``, ``--repo``), e.g. before and after a change:

    python Testing/fault_harness.py --python .venv/bin/python --repo .

The cases themselves are listed in :mod:`fault_cases`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


from fault_cases import CASES, CLASSES, INPUT_FILES, MEMORY_LIMIT_BYTES, OK, ROOT, Case  # noqa: E402,F401


@dataclass
class Outcome:
    code: Optional[int]
    stderr: str
    stdout: str
    new_files: list = field(default_factory=list)
    changed: list = field(default_factory=list)
    nonfinite: list = field(default_factory=list)
    seconds: float = 0.0
    timed_out: bool = False
    folder: Optional[Path] = None

    @property
    def message_lines(self) -> list[str]:
        """stderr without progress-bar lines and blank lines."""
        return [ln for ln in re.split(r"[\r\n]+", self.stderr) if ln.strip() and "%|" not in ln]


# ------------------------------------------------------------------------------- running
def _snapshot(d: Path) -> dict[str, str]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_symlink() or p.is_dir():
            out[str(p.relative_to(d))] = "link" if p.is_symlink() else "dir"
    return out


def _limits() -> None:
    os.umask(0o027)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    except (ImportError, ValueError, OSError):
        pass


def prepare(case: Case, d: Path, inputs: dict, shared: dict) -> None:
    d.mkdir(parents=True)
    for name in INPUT_FILES:
        shutil.copyfile(inputs[name], d / name)
    if case.setup is not None:
        case.setup(d, shared)


def _loaded(pid: int, library: str) -> bool:
    """Whether process ``pid`` has mapped a shared library whose name contains ``library``
    (Linux; elsewhere the start-up signal falls back to a fixed delay)."""
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _readonly_folder() -> str:
    """A folder no file can be created in: /sys for root (file modes do not stop root)."""
    return "/sys" if os.geteuid() == 0 else "/proc"


def run_case(case: Case, d: Path, python: str, repo: Path, shared: dict, timeout: float = 120.0) -> Outcome:
    """Run one prepared case in folder ``d``."""
    fill = {k: str(v) for k, v in shared.items()}
    fill["readonly"] = _readonly_folder()
    argv = [a.format(**fill) for a in case.argv]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MEDDIFFFM_MODELS_DIR": str(d / ".no-cache")}
    env.pop("PYTHONWARNINGS", None)
    before = _snapshot(d)
    t0 = time.monotonic()
    proc = subprocess.Popen([python, "-m", "MedDiffFMLib.cli", *argv], cwd=d, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_limits)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    timed_out = False
    if case.signal is not None:
        signum, when = case.signal
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if when == "start" and (_loaded(proc.pid, "libtorch") or time.monotonic() - t0 > 5.0):
                break
            if when == "run" and "%|" in "".join(err):
                break
            if when == "write" and any(p.name.startswith(".") and ".tmp" in p.name for p in d.iterdir()):
                break
            time.sleep(0.001 if when == "write" else 0.02)
        if proc.poll() is None:
            proc.send_signal(signum)
    try:
        stdout = proc.stdout.read()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        timed_out = True
        stdout = ""
    reader.join(timeout=5)
    after = _snapshot(d)
    new = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in INPUT_FILES and after.get(k) != before[k])
    nonfinite = []
    if proc.returncode == 0:
        for name in case.outputs:
            if (d / name).is_file():
                import nibabel as nib

                if not np.all(np.isfinite(np.asanyarray(nib.load(str(d / name)).dataobj))):
                    nonfinite.append(name)
    return Outcome(proc.returncode, "".join(err), stdout, new, changed, nonfinite, time.monotonic() - t0, timed_out,
                   d)


def verdict(case: Case, out: Outcome) -> str:
    """The class of the issue's table this outcome falls in ("success as expected" for a
    success case that behaved)."""
    if out.changed:
        return "input file overwritten"
    if out.timed_out or (out.code is not None and out.code < 0 and case.signal is None) \
            or "MemoryError" in out.stderr or "out of memory" in out.stderr.lower() and case.code != 0:
        return "runaway memory or run time"
    if case.code != 0 and out.code != 0 and out.new_files:
        return "partial output left behind"
    if "Traceback (most recent call last)" in out.stderr:
        return "traceback shown to the user"
    if case.code == 0:
        ok = out.code == 0 and not out.nonfinite and sorted(out.new_files) == sorted(case.outputs)
        if ok:
            return "success as expected"
        if out.code == 0:
            return "silent wrong result"
        return "unclear or misleading error"
    if out.code == 0:
        return "silent wrong result" if out.nonfinite else case.accepted
    lines = out.message_lines
    text = " ".join(lines).lower()
    if out.code == case.code and len(lines) == 1 and all(w.lower() in text for w in case.words):
        return OK
    return "unclear or misleading error"


def explain(case: Case, out: Outcome) -> str:
    return (f"case {case.id}: exit {out.code} (expected {case.code}); new files {out.new_files}; changed "
            f"{out.changed}; non-finite {out.nonfinite}; {out.seconds:.1f} s; stderr:\n{out.stderr[-2000:]}")


def make_inputs(folder: Path) -> dict:
    """The phantom every case starts from: (k, j, i) 8 x 16 x 16 voxels of 1.5 x 1 x 1 mm, one
    lesion, its mask and its labels."""
    from MedDiffFMLib import io
    from MedDiffFMLib.phantoms import make_phantom
    from MedDiffFMLib.volume import Volume

    folder.mkdir(parents=True, exist_ok=True)
    ph = make_phantom("abdomen", shape_kji=(8, 16, 16), spacing_kji=(1.5, 1.0, 1.0), seed=5, lesions=1,
                      noise_hu=15.0)
    io.write_volume(folder / "ph.nii.gz", ph.volume())
    mask = ph.lesion_mask if ph.lesion_mask.any() else np.zeros(ph.lesion_mask.shape, bool)
    if not mask.any():
        mask[3:5, 6:9, 6:9] = True
    io.write_volume(folder / "m.nii.gz", Volume(mask.astype(np.uint8), ph.ijk_to_ras))
    io.write_volume(folder / "lab.nii.gz", ph.label_volume(), label_names=ph.label_names)
    return {name: folder / name for name in INPUT_FILES}


def run_all(cases, root: Path, inputs: dict, shared: dict, python: str = sys.executable, repo: Path = ROOT,
            workers: int = 2) -> dict[str, tuple[Case, Outcome]]:
    """Every case in its own folder under ``root``, ``workers`` at a time (slow ones first)."""
    order = sorted(cases, key=lambda c: c.signal is None and c.code != 0)

    def one(case: Case):
        d = root / case.id
        prepare(case, d, inputs, shared)
        return case.id, (case, run_case(case, d, python, repo, shared))

    with ThreadPoolExecutor(workers) as pool:
        return dict(pool.map(one, order))


def main() -> int:
    parser = argparse.ArgumentParser(description="count the outcomes of the fault cases for a checkout")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the checkout's environment")
    parser.add_argument("--repo", default=str(ROOT), help="the checkout whose MedDiffFMLib is run")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--only", nargs="*", default=None, help="case ids")
    args = parser.parse_args()
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT / "Testing"))
    from conftest import TINY_MODEL_SEED, randomize_zero_init  # noqa: E402

    from MedDiffFMLib.checkpoint import save_model, sha256_file
    from MedDiffFMLib.networks import ControlNetConfig, FoundationUNet, TaskControlNet, preset

    work = Path(args.work or tempfile.mkdtemp(prefix="faults-"))
    torch.manual_seed(TINY_MODEL_SEED)
    base = randomize_zero_init(FoundationUNet(preset("tiny"))).eval()
    shared = {"model": save_model(work / "models" / "model", base.cfg, base.state_dict())}
    sha = sha256_file(shared["model"] / "model.safetensors")
    try:  # the control channels per task, where the library says them
        from MedDiffFMLib.conditions import CONTROL_CHANNELS
    except ImportError:
        CONTROL_CHANNELS = {"superres": 1, "lesion": 2}
    for task, params in (("superres", {"factor": [2, 1, 1]}), ("lesion", {})):
        channels = CONTROL_CHANNELS[task]
        cfg = ControlNetConfig(task, channels, base.cfg, base_sha256=sha, params=params)
        cn = TaskControlNet(cfg)
        cn.init_from_base(base)
        shared[f"cn_{task}"] = save_model(work / "models" / task, cfg, cn.state_dict())
    inputs = make_inputs(work / "inputs")
    cases = [c for c in CASES if args.only is None or c.id in args.only]
    results = run_all(cases, work / "cases", inputs, shared, args.python, Path(args.repo))
    counts = {k: 0 for k in CLASSES}
    for case in cases:
        c, out = results[case.id]
        v = verdict(c, out)
        counts[v] += 1
        last = out.message_lines[-1][:110] if out.message_lines else ""
        print(f"{case.id:28s} {v:30s} exit {out.code} {out.seconds:5.1f} s  {last}", flush=True)
    print("\n| result | cases |\n|---|---|")
    for k, n in counts.items():
        if n:
            print(f"| {k} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
