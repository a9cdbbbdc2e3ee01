"""The machine list's read model: every machine's summary, in this gateway's memory, by id.

Why in memory: FerretDB v1 pushes neither a sort nor most filters down, so one page of
``GET /v1/machines`` read every summary of the collection, and 16 clients listing 1,000
machines waited 4.3 s at p99. A page from a sorted dict in memory costs microseconds, and the
database sees one full read per refresh instead of one per request.

Freshness, and why it is safe:

- This replica's own writes reach the index at once: the store calls :meth:`MachineIndex.put`
  right after it writes a summary, under the machine's lock, so a client that made or changed a
  machine through this gateway sees it in its next list.
- Other replicas' writes arrive with the next :meth:`MachineIndex.reload`, a full read of the
  summaries every ``DOCKVM_LIST_REFRESH_S`` (and never more often than five times the last
  read took, so a large collection does not turn the refresh into a load of its own). A list
  across several replicas is therefore eventually consistent within that interval.
- A reload's snapshot may be older than a local write made while it was being read: the ids
  put during a reload keep their local summary (the newer one, for this replica's writes).
- Until the first reload finishes, and for ``?ids=`` queries (callers that hold ids expect to see
  what they made on any replica), the store answers from the database.

The index holds summaries only (about 20 fields each); machines are never deleted, so it grows
with the machines ever made, as the summaries collection does.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog
from sortedcontainers import SortedDict

__all__ = ["MachineIndex", "matches"]

log = structlog.get_logger("gateway.listing")

# A reload runs at most this often relative to how long the last one took.
_RELOAD_DUTY = 5.0


def matches(summary: dict[str, Any], filters: dict[str, Any]) -> bool:
    """Whether ``summary`` passes ``filters``: equality, or ``{"$in": [...]}``, per field."""
    for field, want in filters.items():
        have = summary.get(field)
        if isinstance(want, dict):
            if "$in" in want and have not in want["$in"]:
                return False
            if "$gt" in want and not (have is not None and have > want["$gt"]):
                return False
        elif have != want:
            return False
    return True


class MachineIndex:
    """Every machine's summary in id (creation) order; see the module docstring."""

    def __init__(self, refresh_s: float) -> None:
        self.refresh_s = refresh_s
        self._items: SortedDict[str, dict[str, Any]] = SortedDict()
        self._ready = False
        self._put_during_reload: set[str] | None = None
        self._last_reload_at = 0.0
        self._last_reload_took = 0.0

    @property
    def ready(self) -> bool:
        """Whether a first full read has filled the index."""
        return self._ready

    def __len__(self) -> int:
        return len(self._items)

    def select(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        """Every summary passing ``filters``, in id order."""
        return [s for s in self._items.values() if matches(s, filters)]

    def get(self, machine_id: str) -> dict[str, Any] | None:
        """The machine's summary as last put or reloaded, or None."""
        return self._items.get(machine_id)

    def put(self, summary: dict[str, Any]) -> None:
        """Record a summary this replica just wrote."""
        self._items[summary["_id"]] = summary
        if self._put_during_reload is not None:
            self._put_during_reload.add(summary["_id"])

    def put_all(self, summaries: Iterable[dict[str, Any]]) -> None:
        """Record summaries this replica just wrote."""
        for summary in summaries:
            self.put(summary)

    def page(self, filters: dict[str, Any], limit: int, after: str | None) -> list[dict[str, Any]]:
        """Up to ``limit`` summaries passing ``filters`` with ids after ``after``, in id order."""
        out: list[dict[str, Any]] = []
        ids = self._items.irange(minimum=after, inclusive=(False, True)) if after else self._items
        for mid in ids:
            summary = self._items[mid]
            if matches(summary, filters):
                out.append(summary)
                if len(out) >= limit:
                    break
        return out

    def due(self) -> bool:
        """Whether a reload is due (interval passed, and not more often than the duty allows)."""
        gap = max(self.refresh_s, _RELOAD_DUTY * self._last_reload_took)
        return not self._ready or time.monotonic() - self._last_reload_at >= gap

    async def reload(self, read: Callable[[], Awaitable[list[dict[str, Any]]]]) -> int:
        """Replace the index by a full read (``read``); return how many summaries it holds."""
        started = time.monotonic()
        self._put_during_reload = set()
        try:
            docs = await read()
        finally:
            put, self._put_during_reload = self._put_during_reload, None
        fresh: SortedDict[str, dict[str, Any]] = SortedDict((d["_id"], d) for d in docs)
        for mid in put:
            fresh[mid] = self._items[mid]
        self._items = fresh
        self._ready = True
        self._last_reload_at = time.monotonic()
        self._last_reload_took = self._last_reload_at - started
        return len(fresh)

    async def refresh(self, read: Callable[[], Awaitable[list[dict[str, Any]]]]) -> None:
        """Reload when due (called on a short tick)."""
        if self.due():
            count = await self.reload(read)
            log.debug("machine index reloaded", machines=count, took_s=self._last_reload_took)
