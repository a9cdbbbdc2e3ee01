"""In-memory fakes of the monitor's ports, for unit tests of the monitor's logic.

:class:`MemoryMonitorStore` follows the MongoDB store's contract: the contract test in
tests/integration/test_monitor_service.py runs the same checks against both (a published
lifecycle event is not claimed again, the replay point only moves forward). It does not track
the age of events: ``prune`` and ``unpublished`` ignore it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .domain import Emit

__all__ = ["MemoryMonitorStore"]


class MemoryMonitorStore:
    """In-memory :class:`MonitorStore` for unit tests."""

    def __init__(self) -> None:
        self.events: dict[str, dict[str, Any]] = {}
        self.state: dict[str, int] = {}
        self.tracks: dict[str, list[dict]] = {}

    async def setup(self) -> None:
        """Nothing to create."""

    async def prune(self, before: datetime) -> int:
        """Ages are not tracked: nothing is old enough."""
        return 0

    async def claim_event(self, host: str, emit: Emit) -> bool:
        """Same semantics as the Mongo store."""
        old = self.events.setdefault(emit.id, {"published": False, "emit": emit})
        return not old["published"]

    async def event_published(self, emit: Emit) -> None:
        """Mark published."""
        self.events[emit.id]["published"] = True

    async def unpublished(self, host: str, older_than_s: float) -> list[Emit]:
        """Events never marked published (age is not tracked by the fake)."""
        return [e["emit"] for e in self.events.values() if not e["published"]]

    async def last_event_ns(self, host: str) -> int:
        """Replay point."""
        return self.state.get(host, 0)

    async def save_tracks(self, host: str, tracks: list[dict]) -> None:
        """Keep a copy."""
        self.tracks[host] = [dict(t) for t in tracks]

    async def load_tracks(self, host: str) -> list[dict] | None:
        """The copy, if any."""
        return self.tracks.get(host)

    async def set_last_event_ns(self, host: str, time_ns: int) -> None:
        """Only forward."""
        self.state[host] = max(self.state.get(host, 0), time_ns)
