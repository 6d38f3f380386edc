"""Thread defaults: OMP_NUM_THREADS wins, torchrun's processes share the CPUs, --threads sets it."""

from __future__ import annotations

import pytest
import torch

from MedDiffFMLib import cli, threads


def test_default_threads_follow_the_environment():
    cpus = threads.available_cpus()
    assert cpus >= 1
    assert threads.default_threads({"OMP_NUM_THREADS": "3"}) == 3
    assert threads.default_threads({}) == cpus
    assert threads.default_threads({"LOCAL_WORLD_SIZE": str(cpus * 4)}) == 1
    assert threads.default_threads({"LOCAL_WORLD_SIZE": "2"}) == max(1, cpus // 2)


def test_threads_option_sets_torch_and_automatic_never_raises(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert threads.set_threads(None) == 1  # automatic: never more than torch already uses
        out = tmp_path / "p.nii.gz"
        assert cli.main(["--threads", "2", "phantom", "--shape", "4", "6", "6", "-o", str(out)]) == 0
        assert out.is_file() and torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            threads.set_threads(-1)
    finally:
        torch.set_num_threads(before)
