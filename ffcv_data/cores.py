"""How many CPUs this process has: the one place the data package counts them."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPUs this process may run on (its affinity mask: Slurm's binding, taskset), not the
    machine's count, and not what OMP_NUM_THREADS says."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
