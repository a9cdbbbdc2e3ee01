"""Network counters of a container, read from its network namespace via ``/proc/<pid>/net/dev``.

Reading the file through the container's init pid shows that namespace's interfaces, so no
``setns`` and no Docker API call is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..domain import NetStats
from .cgroups import FdCache

__all__ = ["NetnsReader", "NetnsUnavailable", "parse_net_dev", "read_net"]

PROC_ROOT = Path("/proc")


class NetnsUnavailable(Exception):
    """The process is gone, so its namespace cannot be read."""


def parse_net_dev(text: bytes) -> NetStats:
    """Sum rx/tx bytes and packets over every interface but ``lo``."""
    rxb = txb = rxp = txp = 0
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(b":")
        if name.strip() == b"lo" or not rest:
            continue
        f = rest.split()
        rxb += int(f[0])
        rxp += int(f[1])
        txb += int(f[8])
        txp += int(f[9])
    return NetStats(rx_bytes=rxb, tx_bytes=txb, rx_packets=rxp, tx_packets=txp)


def read_net(pid: int, proc: Path = PROC_ROOT) -> NetStats:
    """The network totals of the namespace ``pid`` lives in."""
    try:
        fd = os.open(f"{proc}/{pid}/net/dev", os.O_RDONLY)
        try:
            return parse_net_dev(os.read(fd, 65536))
        finally:
            os.close(fd)
    except OSError as err:
        raise NetnsUnavailable(f"pid {pid}: {err}") from err


class NetnsReader:
    """:func:`read_net` with the file of each pid kept open (a pread per round).

    A descriptor of ``/proc/<pid>/...`` stays bound to that process: if the pid is reused by
    another process later, the old descriptor fails instead of reading the newcomer's netns.
    """

    def __init__(self, proc: Path = PROC_ROOT) -> None:
        self._proc = proc
        self._files = FdCache()

    def __call__(self, pid: int) -> NetStats:
        """The network totals of the namespace ``pid`` lives in."""
        key = str(pid)
        try:
            return parse_net_dev(self._files.read(key, f"{self._proc}/{pid}/net/dev"))
        except OSError as err:
            self._files.drop(key)
            raise NetnsUnavailable(f"pid {pid}: {err}") from err

    def retain(self, pids: set[int]) -> None:
        """Close the files of pids no longer sampled."""
        for key in self._files.groups() - {str(p) for p in pids}:
            self._files.drop(key)

    def close(self) -> None:
        """Close every file."""
        self._files.close()
