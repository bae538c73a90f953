"""The CPU threads a run trains with: torch's count, capped at the cores this process may use
(its CPU affinity and cgroup quota, which torch's default ignores in a container), and one warning
line when the machine is already busier than its cores (a shared CPU can run several times slower
with more threads than idle cores). An explicit OMP_NUM_THREADS or MKL_NUM_THREADS is kept as set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

#: the environment variables that set torch's thread count: the user chose, keep it
CHOSEN = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Whole CPUs of a cgroup v2 quota ("200000 100000": 2), or None without one."""
    try:
        fields = path.read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        return max(1, math.floor(int(fields[0]) / int(fields[1])))
    except (ValueError, ZeroDivisionError):
        return None


def available_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by the cgroup quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    limit = quota()
    return max(1, min(cores, limit) if limit else cores)


def choose(current: int, cores: int, load: float | None, env: Mapping[str, str]) -> tuple[int, str | None]:
    """(threads, a warning or None): ``current`` (torch's count) capped at ``cores`` unless the
    environment chose it; a warning when the 1-minute load average exceeds the cores and the run
    would use several threads (the case that runs several times slower, and has a remedy)."""
    threads = current if any(env.get(k) for k in CHOSEN) else max(1, min(current, cores))
    warning = None
    if load is not None and load > cores and threads > 1:
        warning = (f"warning: the CPU is oversubscribed (load average {load:.1f} on {cores} "
                   f"core{'s' if cores > 1 else ''}): training with {threads} threads can run several times "
                   "slower than with one; OMP_NUM_THREADS=1 often runs faster on a shared CPU")
    return threads, warning


def configure(warn: Callable[[str], None] | None = None) -> int:
    """Apply :func:`choose` to torch in this process; ``warn`` receives the warning line. Returns the
    thread count."""
    import torch

    try:
        load: float | None = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        load = None
    threads, warning = choose(torch.get_num_threads(), available_cores(), load, os.environ)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    if warning and warn is not None:
        warn(warning)
    return threads
