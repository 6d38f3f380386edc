"""The fault suite through the command line: every bad input gets one clear line and the right
exit code before any work, no traceback, the inputs' sha256 unchanged and no file left behind
(temporary ones included); successes write finite outputs with the umask's permissions.

The cases are listed once, in ``fault_harness.CASES``. Subprocess cases run two at a time
while the module's first test waits; cases whose behaviour is the library's (model loading,
devices) run through ``cli.main`` in this process, where torch is already imported.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fault_harness as fh  # noqa: E402

SUBPROCESS = [c for c in fh.CASES if not c.inprocess]
INPROCESS = [c for c in fh.CASES if c.inprocess]


@pytest.fixture(scope="module")
def fault_world(tmp_path_factory, tiny_model_dir, tiny_controlnet_dirs):
    root = tmp_path_factory.mktemp("faults")
    shared = {"model": tiny_model_dir, "cn_lesion": tiny_controlnet_dirs["lesion"],
              "cn_superres": tiny_controlnet_dirs["superres"]}
    return root, fh.make_inputs(root / "inputs"), shared


@pytest.fixture(scope="module")
def subprocess_outcomes(fault_world):
    root, inputs, shared = fault_world
    return fh.run_all(SUBPROCESS, root / "subprocess", inputs, shared)


def _assert_behaved(case: fh.Case, out: fh.Outcome) -> None:
    v = fh.verdict(case, out)
    expected = "success as expected" if case.code == 0 else fh.OK
    assert v == expected, f"{v}: {fh.explain(case, out)}"
    # the details the verdict summarises, spelt out
    assert out.code == case.code, fh.explain(case, out)
    assert "Traceback" not in out.stderr, fh.explain(case, out)
    assert not out.changed, fh.explain(case, out)
    if case.code != 0:
        assert not out.new_files, fh.explain(case, out)
        (line,) = out.message_lines
        assert line.startswith(("error: ", "interrupted: ")), line
    else:
        assert sorted(out.new_files) == sorted(case.outputs), fh.explain(case, out)
        assert not out.nonfinite


@pytest.mark.parametrize("case", SUBPROCESS, ids=lambda c: c.id)
def test_fault_case_subprocess(case, subprocess_outcomes):
    _, out = subprocess_outcomes[case.id]
    _assert_behaved(case, out)


def test_success_respects_the_umask(subprocess_outcomes):
    """Outputs get 0666 less the umask (the cases run with umask 027), not 0600."""
    _, out = subprocess_outcomes["denoise-ok"]
    assert out.code == 0, out.stderr
    assert stat.S_IMODE((out.folder / "den.nii.gz").stat().st_mode) == 0o640


@pytest.mark.parametrize("case", INPROCESS, ids=lambda c: c.id)
def test_fault_case_in_process(case, fault_world, capsys, monkeypatch):
    from MedDiffFMLib import cli

    root, inputs, shared = fault_world
    d = root / "inprocess" / case.id
    fh.prepare(case, d, inputs, shared)
    fill = {k: str(v) for k, v in shared.items()}
    argv = [a.format(**fill) for a in case.argv]
    if case.id == "grid-too-large":
        argv += ["--max-memory-gb", "0.01"]  # the same refusal on any computer, for any model layout
    before = fh._snapshot(d)
    monkeypatch.chdir(d)
    capsys.readouterr()
    code = cli.main(argv)
    cap = capsys.readouterr()
    after = fh._snapshot(d)
    out = fh.Outcome(code, cap.err, cap.out, sorted(set(after) - set(before)),
                     sorted(k for k in before if k in fh.INPUT_FILES and after.get(k) != before[k]))
    if code == 0:
        from MedDiffFMLib import io

        out.nonfinite = [n for n in case.outputs if not np.isfinite(io.read_volume(d / n).array).all()]
    _assert_behaved(case, out)
