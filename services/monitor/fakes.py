"""In-memory fakes of the monitor's ports, for unit tests of the monitor's logic.

:class:`MemorySampleStore` follows the MongoDB store's contract: the contract test in
tests/integration/test_monitor_service.py runs the same checks against both (a repeated sample
is skipped, a published lifecycle event is not claimed again, the replay point only moves
forward). It does not track the age of unpublished events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .domain import Emit
from .store import assume_utc

__all__ = ["MemorySampleStore"]


class MemorySampleStore:
    """In-memory :class:`SampleStore` for unit tests."""

    def __init__(self) -> None:
        self.docs: list[dict] = []
        self.events: dict[str, dict[str, Any]] = {}
        self.state: dict[str, int] = {}
        self.tracks: dict[str, list[dict]] = {}

    async def setup(self) -> None:
        """Nothing to create."""

    async def add_samples(self, docs: list[dict]) -> None:
        """Keep copies; a sample of an IP at a time stored already is skipped."""
        seen = {(d["ip"], assume_utc(d["t"])) for d in self.docs}
        for doc in docs:
            key = (doc["ip"], assume_utc(doc["t"]))
            if key not in seen:
                seen.add(key)
                self.docs.append(dict(doc))

    async def samples(self, ip: str, start: datetime, end: datetime) -> list[dict]:
        """Filter and sort like the real store."""
        found = [d for d in self.docs if d["ip"] == ip and start <= assume_utc(d["t"]) < end]
        return sorted(found, key=lambda d: d["t"])

    async def prune(self, before: datetime) -> int:
        """Drop old docs."""
        keep = [d for d in self.docs if assume_utc(d["t"]) >= before]
        n = len(self.docs) - len(keep)
        self.docs = keep
        return n

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
