"""Where a stretch of wall time spent the host's CPU: CPU seconds by party, read from ``/proc``.

A :class:`CpuMeter` snapshots every process (psutil) and the host's total at ``start()`` and
again at ``stop()``; the difference is put to one party per process:

- ``engine``: dockerd, containerd, the shims and runc (a runc that exits is reaped by its shim,
  so its CPU shows in the shim's children);
- ``machines``: processes in a container's cgroup (``/docker/…``), the machines' own work;
- ``platform``: dockvm's services (``python -m services.…``) and the programs they ran (mkfs,
  losetup, nft: reaped children count in their parent);
- ``database`` (FerretDB), ``broker`` (RabbitMQ);
- ``client``: the benchmark itself and the ``docker`` commands it ran (its reaped children);
- ``kernel and other``: the host's total less the above: kernel threads (the loop devices' I/O,
  kworkers, softirqs) and processes that came and went without a watched parent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import psutil

__all__ = ["PARTIES", "CpuMeter"]

PARTIES = (
    "engine", "machines", "platform", "database", "broker", "client", "kernel and other",
)  # fmt: skip
_ENGINE = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2", "runc",
           "docker-proxy", "docker-init")  # fmt: skip


def _party(p: psutil.Process, me: int) -> str | None:
    if p.pid == me:
        return "client"
    name = p.info["name"] or ""
    if name in _ENGINE or name.startswith("containerd-shim"):
        return "engine"
    if name == "ferretdb":
        return "database"
    if name in ("beam.smp", "erl_child_setup", "epmd", "inet_gethost"):
        return "broker"
    cmd = p.info["cmdline"] or []
    if len(cmd) >= 3 and cmd[1] == "-m" and cmd[2].startswith("services."):
        return "platform"
    try:
        with open(f"/proc/{p.pid}/cgroup") as f:
            if ":/docker/" in f.read():
                return "machines"
    except OSError:
        return None
    return None


def _snapshot() -> dict[tuple[int, float], tuple[str, float]]:
    """(pid, create time) -> (party, CPU seconds with reaped children) of each watched process."""
    me = os.getpid()
    out: dict[tuple[int, float], tuple[str, float]] = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times", "create_time"]):
        party = _party(p, me)
        t = p.info["cpu_times"]
        if party is None or t is None:
            continue
        cpu = t.user + t.system + t.children_user + t.children_system
        out[(p.pid, p.info["create_time"])] = (party, cpu)
    return out


def _host_busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


@dataclass
class CpuMeter:
    """CPU seconds by party between ``start()`` and ``stop()``."""

    seconds: dict[str, float] = field(default_factory=dict)
    _before: dict[tuple[int, float], tuple[str, float]] = field(default_factory=dict)
    _host: float = 0.0

    def start(self) -> None:
        """Take the first snapshot."""
        self._before, self._host = _snapshot(), _host_busy()

    def stop(self) -> dict[str, float]:
        """Take the second snapshot; return (and keep) CPU seconds by party, and ``total``."""
        after, host = _snapshot(), _host_busy()
        spent = dict.fromkeys(PARTIES, 0.0)
        for key, (party, cpu) in after.items():
            before = self._before.get(key)
            spent[party] += cpu - (before[1] if before else 0.0)
        spent["total"] = host - self._host
        spent["kernel and other"] = spent["total"] - sum(
            v for k, v in spent.items() if k not in ("total", "kernel and other")
        )
        self.seconds = spent
        return spent
