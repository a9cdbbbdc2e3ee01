"""What the monitor needs to know about the host itself: CPUs and memory."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["host_cpus", "host_memory"]


def host_cpus() -> int:
    """Online CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) or os.cpu_count() or 1


def host_memory(proc: Path = Path("/proc")) -> int:
    """``MemTotal`` of the host in bytes."""
    for line in (proc / "meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")
