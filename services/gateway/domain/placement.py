"""Placement of a new machine on a host, and host liveness from heartbeat age (pure).

The rule: keep the hosts that are online (not stale, down or drained), in the pool's dc and
fit the machine under their overcommit ratios; among them prefer the hosts with the fewest
machines of the same app (anti-affinity, soft: a host that already holds one is used when no
other fits); among those, pack for density: the most-allocated host that fits. A batch is placed
machine after machine, each seeing the ones before, and fails whole when one does not fit (the
machines of a batch are alike, so a pass that places one wherever it fits fills the dc as fully
as any other would: it fails only when the dc as a whole cannot hold the batch).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

__all__ = [
    "DcLoad",
    "HostView",
    "Ratios",
    "Res",
    "host_status",
    "largest",
    "place",
    "place_all",
    "place_prefix",
]


@dataclass(frozen=True, slots=True)
class Res:
    """CPUs, memory bytes and disk bytes."""

    cpus: float = 0.0
    memory: int = 0
    disk: int = 0

    def __add__(self, other: Res) -> Res:
        return Res(self.cpus + other.cpus, self.memory + other.memory, self.disk + other.disk)


@dataclass(frozen=True, slots=True)
class Ratios:
    """Overcommit ratio per resource."""

    cpus: float = 1.0
    memory: float = 1.0
    disk: float = 1.0


@dataclass(frozen=True, slots=True)
class HostView:
    """What placement needs to know of one host."""

    host_id: str
    dc: str
    status: str
    capacity: Res
    allocated: Res
    ratios: Ratios = Ratios()

    def limit(self) -> Res:
        """Capacity after overcommit."""
        return Res(
            self.capacity.cpus * self.ratios.cpus,
            int(self.capacity.memory * self.ratios.memory),
            int(self.capacity.disk * self.ratios.disk),
        )

    def fits(self, need: Res) -> bool:
        """Whether ``need`` fits next to what is already allocated."""
        lim, after = self.limit(), self.allocated + need
        # A small epsilon so that 0.1 + 0.2 cpus fit in 0.3.
        return (
            after.cpus <= lim.cpus + 1e-9 and after.memory <= lim.memory and after.disk <= lim.disk
        )

    def fill(self) -> float:
        """How allocated the host is: the fullest resource's share of its limit."""
        lim = self.limit()
        shares = [
            self.allocated.cpus / lim.cpus if lim.cpus else 1.0,
            self.allocated.memory / lim.memory if lim.memory else 1.0,
            self.allocated.disk / lim.disk if lim.disk else 1.0,
        ]
        return max(shares)


@dataclass(frozen=True, slots=True)
class DcLoad:
    """What a dc's hosts hold by our records: resources per host, machines per app and host."""

    allocated: dict[str, Res] = field(default_factory=dict)
    apps: dict[str, dict[str, int]] = field(default_factory=dict)


def place(
    hosts: Iterable[HostView], need: Res, dc: str, app_counts: Mapping[str, int]
) -> str | None:
    """The host for a new machine needing ``need`` in ``dc``, or None when nothing fits."""
    fitting = [h for h in hosts if h.status == "online" and h.dc == dc and h.fits(need)]
    if not fitting:
        return None
    fewest = min(app_counts.get(h.host_id, 0) for h in fitting)
    spread = [h for h in fitting if app_counts.get(h.host_id, 0) == fewest]
    # Most allocated first; the host id breaks ties so placement is deterministic.
    spread.sort(key=lambda h: (-h.fill(), h.host_id))
    return spread[0].host_id


def place_all(
    hosts: Iterable[HostView], needs: Sequence[tuple[str, Res]], dc: str, load: DcLoad
) -> list[str] | None:
    """A host for each ``(app, need)`` in ``dc``, placed in order, each seeing the ones before;
    None when one of them fits nowhere (the batch fails whole)."""
    chosen = place_prefix(hosts, needs, dc, load)
    return chosen if len(chosen) == len(needs) else None


def place_prefix(
    hosts: Iterable[HostView], needs: Sequence[tuple[str, Res]], dc: str, load: DcLoad
) -> list[str]:
    """Hosts for the longest prefix of ``needs`` that fits, placed as :func:`place_all` does
    (for a batch of alike machines: as many as the dc can hold)."""
    views = {h.host_id: h for h in hosts}
    counts = {app: dict(per_host) for app, per_host in load.apps.items()}
    chosen: list[str] = []
    for app, need in needs:
        per_host = counts.setdefault(app, {})
        host = place(views.values(), need, dc, per_host)
        if host is None:
            break
        views[host] = replace(views[host], allocated=views[host].allocated + need)
        per_host[host] = per_host.get(host, 0) + 1
        chosen.append(host)
    return chosen


def largest(hosts: Iterable[HostView], dc: str | None = None) -> Res | None:
    """The largest limit per resource among the hosts (of ``dc``), or None without hosts."""
    lims = [h.limit() for h in hosts if dc is None or h.dc == dc]
    if not lims:
        return None
    return Res(max(r.cpus for r in lims), max(r.memory for r in lims), max(r.disk for r in lims))


def host_status(age_s: float, stale_s: float, down_s: float) -> str:
    """``online``, ``stale`` or ``down`` from the age of the last heartbeat."""
    if age_s < stale_s:
        return "online"
    if age_s < down_s:
        return "stale"
    return "down"
