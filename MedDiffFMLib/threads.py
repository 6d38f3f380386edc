"""How many CPU threads torch (and onnxruntime) use: ``--threads`` and its default.

torch's own default is the number of physical cores of the machine, which oversubscribes a
container limited to fewer CPUs, a Slurm job's CPU set, or several torchrun processes on one
node; on busy cores extra threads spin and slow everything down (measured: two threads under
contention 2.9x slower than one).
"""

from __future__ import annotations

import math
import os
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
