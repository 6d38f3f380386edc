"""Thread defaults: OMP_NUM_THREADS wins, torchrun's processes share the CPUs, --threads sets it."""

from __future__ import annotations

import pytest
import torch

from MedDiffFMLib import cli, threads
from MedDiffFMLib.threads import SLOW_BF16_MESSAGE, cpu_has_native_bf16
from MedDiffFMLib.training import Case


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


X86_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
X86_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize("cpuinfo, native", [(X86_AVX2, False), (X86_BF16, True), (ARM_BF16, True),
                                             ("processor\t: 0\n", None), ("", None)])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, native):
    assert cpu_has_native_bf16(cpuinfo) is native


@pytest.mark.parametrize("native, warns", [(False, True), (True, False), (None, False)])
def test_bf16_on_a_cpu_without_it_warns_in_training_and_sampling(monkeypatch, tmp_path, tiny_predictor, native, warns):
    import warnings

    from MedDiffFMLib.networks import preset
    from MedDiffFMLib.sampling import PatchSampler, SamplerOptions
    from MedDiffFMLib.training import Trainer, TrainOptions

    monkeypatch.setattr(threads, "cpu_has_native_bf16", lambda: native)
    case = Case(torch.zeros(8, 8, 8), (1.0, 1.0, 1.0))
    for make in (lambda: Trainer([case], tmp_path, TrainOptions(steps=1, progress=False, precision="bf16"),
                                 preset("tiny", window=8), device="cpu"),
                 lambda: PatchSampler(tiny_predictor, SamplerOptions(precision="bf16"))):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            make()
        assert any(SLOW_BF16_MESSAGE in str(w.message) for w in seen) is warns
    with warnings.catch_warnings(record=True) as seen:  # fp32 never warns
        warnings.simplefilter("always")
        PatchSampler(tiny_predictor, SamplerOptions(precision="fp32"))
    assert not seen
