"""Read a container's cgroup files directly, on cgroup v1 or v2 (detected from the mount).

This is the monitor's hot path: a handful of small reads per container and no Docker API call.
The cgroup of a container is found from ``/proc/<pid>/cgroup`` of its init, so both the
cgroupfs and the systemd drivers work; without a pid the cgroupfs layout (``/docker/<id>``)
is assumed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from ..domain import CgroupStats

__all__ = [
    "CgroupReader",
    "CgroupUnavailable",
    "CgroupV1Reader",
    "CgroupV2Reader",
    "CgroupVersion",
    "FdCache",
    "detect_version",
    "make_reader",
]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_ROOT = Path("/proc")


class CgroupUnavailable(Exception):
    """The container's cgroup is gone (it stopped between listing and reading)."""


class CgroupVersion(StrEnum):
    """Which cgroup hierarchy the host mounts at its root."""

    V1 = "v1"
    V2 = "v2"


def detect_version(root: Path = CGROUP_ROOT) -> CgroupVersion:
    """v2 when the root is the unified hierarchy; a v1 or hybrid host has controller dirs."""
    return CgroupVersion.V2 if (root / "cgroup.controllers").exists() else CgroupVersion.V1


class CgroupReader(Protocol):
    """Port: the cgroup figures of one container."""

    version: CgroupVersion

    def read(self, container_id: str, pid: int | None) -> CgroupStats:
        """Read the container's counters; raise :class:`CgroupUnavailable` if it is gone."""
        ...

    def forget(self, container_id: str) -> None:
        """Drop what is cached about a container (its paths)."""
        ...


def _read(path: Path | str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


class FdCache:
    """Open files kept open and re-read with ``pread(fd, n, 0)``.

    cgroup and ``/proc`` files are seq files: a read at offset 0 regenerates them, so keeping
    the descriptor saves the open and close that are ~90% of a small read's cost. A file of a
    removed cgroup (or a dead pid) fails or reads empty: the caller then drops its group.
    """

    def __init__(self) -> None:
        self._fds: dict[str, dict[str, int]] = {}

    def read(self, group: str, path: str) -> bytes:
        """The current content of ``path``, kept open under ``group``."""
        fds = self._fds.setdefault(group, {})
        fd = fds.get(path)
        if fd is None:
            fd = fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        data = os.pread(fd, 65536, 0)
        if not data:
            raise FileNotFoundError(f"{path} reads empty (gone)")
        return data

    def drop(self, group: str) -> None:
        """Close every file of ``group``."""
        for fd in self._fds.pop(group, {}).values():
            os.close(fd)

    def groups(self) -> set[str]:
        """The groups holding open files."""
        return set(self._fds)

    def close(self) -> None:
        """Close everything."""
        for group in list(self._fds):
            self.drop(group)


def _int(path: Path | str) -> int:
    return int(_read(path))


def _kv(data: Path | str | bytes) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    text = data if isinstance(data, bytes) else _read(data)
    for line in text.splitlines():
        key, _, value = line.partition(b" ")
        if value:
            out[key] = int(value)
    return out


def _proc_cgroups(pid: int, proc: Path) -> dict[str, str]:
    """controller → path from ``/proc/<pid>/cgroup`` (v2's unified line under ``""``)."""
    out: dict[str, str] = {}
    for line in _read(proc / str(pid) / "cgroup").decode().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            out[c.removeprefix("name=")] = path
    return out


@dataclass
class CgroupV1Reader:
    """cgroup v1: one hierarchy per controller (cpu, cpuacct, memory, blkio, pids)."""

    root: Path = CGROUP_ROOT
    proc: Path = PROC_ROOT
    parent: str = "docker"
    version: CgroupVersion = CgroupVersion.V1
    static_every: int = 6

    def __post_init__(self) -> None:
        self._paths: dict[tuple[str, int | None], dict[str, str]] = {}
        # quota and limit change only on a resize: re-read every ``static_every`` reads (and
        # at once after forget(), which the service calls on Docker's update event).
        self._static: dict[str, tuple[int, float | None, int]] = {}
        self._files = FdCache()

    def _dirs(self, container_id: str, pid: int | None) -> dict[str, Path]:
        key = (container_id, pid)
        dirs = self._paths.get(key)
        if dirs is None:
            rel = {c: f"/{self.parent}/{container_id}" for c in _V1_CONTROLLERS}
            if pid:
                try:
                    rel.update(_proc_cgroups(pid, self.proc))
                except (OSError, ValueError) as err:
                    raise CgroupUnavailable(f"{container_id}: pid {pid} is gone") from err
            dirs = {c: str(self.root / c / rel[c].lstrip("/")) for c in _V1_CONTROLLERS}
            self._paths = {k: v for k, v in self._paths.items() if k[0] != container_id}
            self._paths[key] = dirs
        return dirs

    def forget(self, container_id: str) -> None:
        """Drop cached paths, open files, quota and limit of ``container_id``."""
        self._paths = {k: v for k, v in self._paths.items() if k[0] != container_id}
        self._static.pop(container_id, None)
        self._files.drop(container_id)

    def _quota_limit(self, container_id: str, cpu: str, mem: str) -> tuple[float | None, int]:
        reads, quota_cpus, limit = self._static.get(container_id, (0, None, 0))
        if reads % self.static_every == 0:
            quota = _int(cpu + "/cpu.cfs_quota_us")
            period = _int(cpu + "/cpu.cfs_period_us")
            quota_cpus = quota / period if quota > 0 and period > 0 else None
            limit = _int(mem + "/memory.limit_in_bytes")
        self._static[container_id] = (reads + 1, quota_cpus, limit)
        return quota_cpus, limit

    def read(self, container_id: str, pid: int | None) -> CgroupStats:
        """Read cpu, cpuacct, memory, blkio and pids of the container."""
        d = self._dirs(container_id, pid)

        def read(path: str) -> bytes:
            return self._files.read(container_id, path)

        try:
            cpu, mem, blk = d["cpu"], d["memory"], d["blkio"]
            stat = _kv(read(cpu + "/cpu.stat"))
            quota_cpus, limit = self._quota_limit(container_id, cpu, mem)
            ms = _kv(read(mem + "/memory.stat"))
            oom = _kv(read(mem + "/memory.oom_control"))
            rb, wb = _blkio(read(blk + "/blkio.throttle.io_service_bytes_recursive"))
            ro, wo = _blkio(read(blk + "/blkio.throttle.io_serviced_recursive"))
            return CgroupStats(
                cpu_usage_ns=int(read(d["cpuacct"] + "/cpuacct.usage")),
                nr_periods=stat.get(b"nr_periods", 0),
                nr_throttled=stat.get(b"nr_throttled", 0),
                throttled_ns=stat.get(b"throttled_time", 0),
                quota_cpus=quota_cpus,
                mem_usage=int(read(mem + "/memory.usage_in_bytes")),
                mem_limit=limit,
                mem_rss=ms.get(b"total_rss", ms.get(b"rss", 0)),
                mem_cache=ms.get(b"total_cache", ms.get(b"cache", 0)),
                mem_inactive_file=ms.get(b"total_inactive_file", ms.get(b"inactive_file", 0)),
                oom_kills=oom.get(b"oom_kill", 0),
                blk_read_bytes=rb,
                blk_write_bytes=wb,
                blk_read_ops=ro,
                blk_write_ops=wo,
                pids=int(read(d["pids"] + "/pids.current")),
            )
        except (OSError, ValueError) as err:
            self.forget(container_id)
            raise CgroupUnavailable(f"{container_id}: cgroup unreadable ({err})") from err


_V1_CONTROLLERS = ("cpu", "cpuacct", "memory", "blkio", "pids")


def _blkio(data: bytes) -> tuple[int, int]:
    """Sum the per-device Read and Write lines of a v1 blkio file (skipping Total)."""
    read = write = 0
    for line in data.splitlines():
        parts = line.split()
        if len(parts) == 3:
            if parts[1] == b"Read":
                read += int(parts[2])
            elif parts[1] == b"Write":
                write += int(parts[2])
    return read, write


@dataclass
class CgroupV2Reader:
    """cgroup v2: one unified directory per container."""

    root: Path = CGROUP_ROOT
    proc: Path = PROC_ROOT
    parent: str = "docker"
    version: CgroupVersion = CgroupVersion.V2

    def __post_init__(self) -> None:
        self._paths: dict[tuple[str, int | None], Path] = {}
        self._files = FdCache()

    def _dir(self, container_id: str, pid: int | None) -> Path:
        key = (container_id, pid)
        path = self._paths.get(key)
        if path is None:
            rel = f"/{self.parent}/{container_id}"
            if pid:
                try:
                    rel = _proc_cgroups(pid, self.proc).get("", rel)
                except (OSError, ValueError) as err:
                    raise CgroupUnavailable(f"{container_id}: pid {pid} is gone") from err
            path = self.root / rel.lstrip("/")
            self.forget(container_id)
            self._paths[key] = path
        return path

    def forget(self, container_id: str) -> None:
        """Drop cached paths and open files of ``container_id``."""
        for key in [k for k in self._paths if k[0] == container_id]:
            del self._paths[key]
        self._files.drop(container_id)

    def read(self, container_id: str, pid: int | None) -> CgroupStats:
        """Read cpu.stat, cpu.max, memory.*, io.stat and pids.current."""
        d = str(self._dir(container_id, pid))

        def read(name: str) -> bytes:
            return self._files.read(container_id, f"{d}/{name}")

        try:
            stat = _kv(read("cpu.stat"))
            quota_s, _, period_s = read("cpu.max").strip().partition(b" ")
            ms = _kv(read("memory.stat"))
            events = _kv(read("memory.events"))
            limit_s = read("memory.max").strip()
            rb = wb = ro = wo = 0
            # io.stat is empty until the cgroup does block IO: read it without the cache
            for line in _read(f"{d}/io.stat").splitlines():
                for field in line.split()[1:]:
                    k, _, v = field.partition(b"=")
                    if k == b"rbytes":
                        rb += int(v)
                    elif k == b"wbytes":
                        wb += int(v)
                    elif k == b"rios":
                        ro += int(v)
                    elif k == b"wios":
                        wo += int(v)
            period = int(period_s or 100000)
            return CgroupStats(
                cpu_usage_ns=stat.get(b"usage_usec", 0) * 1000,
                nr_periods=stat.get(b"nr_periods", 0),
                nr_throttled=stat.get(b"nr_throttled", 0),
                throttled_ns=stat.get(b"throttled_usec", 0) * 1000,
                quota_cpus=None if quota_s == b"max" else int(quota_s) / period,
                mem_usage=int(read("memory.current")),
                mem_limit=None if limit_s == b"max" else int(limit_s),
                mem_rss=ms.get(b"anon", 0),
                mem_cache=ms.get(b"file", 0),
                mem_inactive_file=ms.get(b"inactive_file", 0),
                oom_kills=events.get(b"oom_kill", 0),
                blk_read_bytes=rb,
                blk_write_bytes=wb,
                blk_read_ops=ro,
                blk_write_ops=wo,
                pids=int(read("pids.current")),
            )
        except (OSError, ValueError) as err:
            self.forget(container_id)
            raise CgroupUnavailable(f"{container_id}: cgroup unreadable ({err})") from err


def make_reader(
    root: Path = CGROUP_ROOT, proc: Path = PROC_ROOT, parent: str = "docker"
) -> CgroupReader:
    """The reader for the hierarchy the host mounts at ``root``."""
    if detect_version(root) is CgroupVersion.V2:
        return CgroupV2Reader(root, proc, parent)
    return CgroupV1Reader(root, proc, parent)
