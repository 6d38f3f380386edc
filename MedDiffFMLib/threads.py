"""The CPU as a compute device: how many threads torch (and onnxruntime) use (``--threads``
and its default), and whether bf16 runs natively.

torch's own default is the number of physical cores of the machine, which oversubscribes a
container limited to fewer CPUs, a Slurm job's CPU set, or several torchrun processes on one
node; on busy cores extra threads spin and slow everything down (measured: two threads under
contention 2.9x slower than one).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Optional


def available_cpus() -> int:
    """CPUs this process may use: its affinity set, capped by a cgroup CPU quota when set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def default_threads(env: Optional[dict] = None) -> int:
    """OMP_NUM_THREADS when set; else the available CPUs shared among the processes that
    torchrun started on this node (LOCAL_WORLD_SIZE)."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, available_cpus() // max(1, local))


def set_threads(threads: Optional[int] = None) -> int:
    """Set torch's intra-op threads to ``threads``; with ``None`` or 0, lower them to
    :func:`default_threads` when torch would use more (never raise them). Returns the count."""
    import torch

    if threads is not None and int(threads) < 0:
        raise ValueError(f"threads must be >= 1 (0 = automatic), got {threads}")
    n = int(threads) if threads else min(default_threads(), torch.get_num_threads())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


# CPU flags (Linux /proc/cpuinfo) of bf16 arithmetic in hardware: AVX-512 BF16 and AMX on
# x86, the BF16 extension on Arm. Without them torch emulates bf16: a training step of the
# demo network in bf16 autocast took 90 s against 2.8 s in fp32 on an AVX2-only CPU, while
# on a CPU with AVX-512 BF16 it was 2.3-3.4x faster than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
SLOW_BF16_MESSAGE = ("this CPU has no native bf16 (no AVX-512 BF16, AMX or Arm BF16 flag): bf16 is emulated and "
                     "measured 30x slower than fp32 on such a CPU; use fp32")


def cpu_has_native_bf16(cpuinfo: Optional[str] = None) -> Optional[bool]:
    """Whether the CPU computes bf16 in hardware, read from the flags in ``cpuinfo`` (default:
    /proc/cpuinfo); None where that cannot be told (no /proc/cpuinfo, no flags line)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    if not flags:
        return None
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def warn_if_emulated_bf16() -> None:
    """Warn (:data:`SLOW_BF16_MESSAGE`) when this CPU has no bf16 in hardware; called where
    bf16 autocast is set up on the CPU."""
    if cpu_has_native_bf16() is False:
        warnings.warn(SLOW_BF16_MESSAGE, stacklevel=3)
