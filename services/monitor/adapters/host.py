"""What the monitor needs to know about the host itself: CPUs and memory."""

from __future__ import annotations

import os
import resource
from pathlib import Path

__all__ = ["host_cpus", "host_memory", "raise_fd_limit"]


def host_cpus() -> int:
    """Online CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) or os.cpu_count() or 1


def host_memory(proc: Path = Path("/proc")) -> int:
    """``MemTotal`` of the host in bytes."""
    for line in (proc / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (the sampler keeps ~12 files open per
    container); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
