"""One sampling round: read every known container's cgroup and netns, build its sample.

Synchronous and file-only (no Docker API): the caller runs it in an executor thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from libs.common.clock import utcnow
from libs.common.contracts.monitor import ContainerSample

from .adapters.cgroups import CgroupReader, CgroupUnavailable
from .adapters.netns import NetnsUnavailable
from .domain import ContainerMeta, NetStats, Reading, build_sample

__all__ = ["Sampler", "Target"]


@dataclass(frozen=True, slots=True)
class Target:
    """A running container to sample: who it is and its init's pid."""

    meta: ContainerMeta
    pid: int | None


class Sampler:
    """Keeps the previous reading of each container to turn counters into rates."""

    def __init__(
        self,
        cgroups: CgroupReader,
        net: Callable[[int], NetStats],
        *,
        host_cpus: int,
        host_memory: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._cgroups = cgroups
        self._net = net
        self._cpus = host_cpus
        self._memory = host_memory
        self._clock = clock
        # Rates come from the monotonic clock; the wall clock only stamps the samples.
        self._wall_clock = wall_clock
        self._prev: dict[str, Reading] = {}

    def forget(self, container_id: str) -> None:
        """Re-read everything of a container next round (its limits changed)."""
        self._cgroups.forget(container_id)

    def round(
        self, targets: Mapping[str, Target]
    ) -> list[tuple[ContainerSample, dict[str, int | float]]]:
        """Sample every target; a container that vanished mid-round is skipped."""
        at = self._wall_clock()
        out = []
        for cid, target in targets.items():
            try:
                cg = self._cgroups.read(cid, target.pid)
                net = self._net(target.pid) if target.pid else NetStats()
            except (CgroupUnavailable, NetnsUnavailable):
                self._prev.pop(cid, None)
                continue
            reading = Reading(at=at, mono_s=self._clock(), cgroup=cg, net=net)
            out.append(
                build_sample(
                    target.meta,
                    reading,
                    self._prev.get(cid),
                    host_cpus=self._cpus,
                    host_memory=self._memory,
                )
            )
            self._prev[cid] = reading
        for gone in set(self._prev) - set(targets):
            del self._prev[gone]
            self._cgroups.forget(gone)
        retain = getattr(self._net, "retain", None)
        if retain is not None:
            retain({t.pid for t in targets.values() if t.pid})
        return out
