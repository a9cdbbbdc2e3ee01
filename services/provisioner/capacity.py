"""What this host can still give: its size, cached, and its free disk, tracked in process.

A create must not ask the engine or the disk for host-wide facts: Docker's ``info`` is slow and
host-wide, and measuring free disk stats every image file, so N parallel creates would each pay
for it and then all pass a check that, together, they do not fit. Instead:

- the host's CPUs and memory are read once and refreshed by the heartbeat (they do not change
  while the agent runs);
- free disk is measured once (then on every heartbeat) and each create or disk growth *reserves*
  its size against that measurement before it makes anything, with no await between the check and
  the reservation, so parallel creates admit only what fits together.

A reservation ends when its create fails (the undo removed the disk) or, once its disk exists, at
the first measurement that started after it finished (the measurement counts the disk itself);
a measurement under way while a create runs keeps its reservation, so the ledger errs on refusing.
A destroy frees space the ledger cannot see: it marks the measurement stale, and the next create
measures the disk again (once, however many arrive together).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from libs.common.errors import TransientError

from .adapters.runtime import ContainerRuntime
from .adapters.volumes import VolumeDriver
from .domain import HostFacts

__all__ = ["DiskLedger", "HostCapacity"]


@dataclass
class DiskLedger:
    """Free disk as last measured, less what creates and growths reserved since (pure)."""

    measured: int | None = None
    # key → bytes; a key is in ``done`` once its work finished and its disk (if any) exists.
    reserved: dict[str, int] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)

    @property
    def available(self) -> int:
        """Bytes a new disk may still take (none before a first measurement)."""
        if self.measured is None:
            return 0  # refuse rather than admit against a disk nobody measured
        return self.measured - sum(self.reserved.values())

    def reserve(self, key: str, size: int) -> None:
        """Hold ``size`` bytes for ``key`` (its create or growth is under way)."""
        self.reserved[key] = self.reserved.get(key, 0) + size
        self.done.discard(key)

    def release(self, key: str) -> None:
        """The work failed and left no disk: give its bytes back now."""
        self.reserved.pop(key, None)
        self.done.discard(key)

    def finish(self, key: str) -> None:
        """The work made its disk: keep the bytes until a measurement counts the disk."""
        if key in self.reserved:
            self.done.add(key)

    def measure_started(self) -> frozenset[str]:
        """The keys a measurement starting now will count; pass them to :meth:`measured_as`."""
        return frozenset(self.done)

    def measured_as(self, free: int, counted: frozenset[str]) -> None:
        """A measurement that started when ``counted`` were done gave ``free`` bytes."""
        self.measured = free
        for key in counted & self.done:
            self.reserved.pop(key, None)
            self.done.discard(key)


class HostCapacity:
    """The host's facts for admission checks, without host-wide calls on the create path."""

    def __init__(self, runtime: ContainerRuntime, volumes: VolumeDriver, min_memory: int) -> None:
        self._runtime = runtime
        self._volumes = volumes
        self._min_memory = min_memory
        self._size: tuple[float, int] | None = None
        self._disk_total = 0
        self._stale = False
        self.disk = DiskLedger()
        # N creates arriving together with nothing (or a stale disk) measured measure once.
        self._measuring = asyncio.Lock()

    async def refresh(self, runtime: ContainerRuntime | None = None) -> tuple[float, int, int]:
        """Measure the host again (the heartbeat does): (cpus, memory, disk total)."""
        cpus, memory = await (runtime or self._runtime).host_resources()
        self._size = (cpus, memory)
        await self._measure_disk()
        return cpus, memory, self._disk_total

    async def _measure_disk(self) -> None:
        self._stale = False  # a destroy while this runs marks it stale again
        counted = self.disk.measure_started()
        total, free = await self._volumes.capacity()
        self._disk_total = total
        self.disk.measured_as(free, counted)

    @property
    def min_disk(self) -> int:
        """The smallest data disk the volume driver can make (the heartbeat reports it)."""
        return self._volumes.min_size

    def disk_freed(self) -> None:
        """A disk was removed: measure free space again before the next check."""
        self._stale = True

    async def facts(self) -> HostFacts:
        """The host's size and the disk still free; measured only when unknown or stale."""
        if self._size is None or self.disk.measured is None or self._stale:
            async with self._measuring:
                if self._size is None or self.disk.measured is None:
                    await self.refresh()
                elif self._stale:
                    await self._measure_disk()
        size = self._size
        if size is None:  # refresh() sets it before it returns; only a bug gets here
            raise TransientError("the host's size is not measured yet")
        return HostFacts(*size, self.disk.available, self._min_memory, self.min_disk)

    @contextmanager
    def reserving(self, key: str, size: int) -> Iterator[None]:
        """Hold ``size`` bytes of disk while the block runs; give them back if it raises."""
        self.disk.reserve(key, size)
        try:
            yield
        except BaseException:
            self.disk.release(key)
            raise
        self.disk.finish(key)
