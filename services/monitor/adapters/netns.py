"""Network counters of a container, read from its network namespace via ``/proc/<pid>/net/dev``.

Reading the file through the container's init pid shows that namespace's interfaces, so no
``setns`` and no Docker API call is needed.
"""

from __future__ import annotations

from pathlib import Path

from ..domain import NetStats

__all__ = ["NetnsUnavailable", "parse_net_dev", "read_net"]

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
        with open(proc / str(pid) / "net" / "dev", "rb", buffering=0) as f:
            return parse_net_dev(f.read())
    except OSError as err:
        raise NetnsUnavailable(f"pid {pid}: {err}") from err
