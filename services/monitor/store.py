"""The monitor's history in MongoDB: samples keyed by IP and time, and lifecycle events.

Collections:
- ``samples``: one document per container per interval ``{ip, t, host, machine_id, ..., d}``
  where ``d`` holds the counter deltas since the previous sample; indexed by ``(ip, t)``.
  Samples outlive their container: the history of an IP stays queryable after a destroy.
  Retention is an explicit job (:meth:`SampleStore.prune`), FerretDB v1 having no TTL index.
- ``lifecycle``: one document per lifecycle event, ``_id`` = its deterministic envelope id; the
  unique ``_id`` is what makes a replayed event publish once across monitor restarts.
- ``monitor_state``: per host, the time of the last Docker event handled (the replay point)
  and the lifecycle tracker's state, so a restarted monitor resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.contracts.envelope import message_model
from libs.common.contracts.monitor import ContainerSample
from libs.common.db import ensure_indexes
from libs.common.errors import translate_errors

from .domain import Emit

__all__ = ["MemorySampleStore", "MongoSampleStore", "SampleStore", "sample_doc"]

_SAMPLES, _LIFECYCLE, _STATE = "samples", "lifecycle", "monitor_state"


def sample_doc(host: str, sample: ContainerSample, deltas: Mapping[str, int | float]) -> dict:
    """The stored form of a sample."""
    doc = sample.model_dump(mode="python", exclude={"at", "ip"})
    doc.update(ip=str(sample.ip) if sample.ip else None, t=sample.at, host=host, d=dict(deltas))
    return doc


class SampleStore(Protocol):
    """Port: history of samples and lifecycle events."""

    async def setup(self) -> None:
        """Create indexes."""
        ...

    async def add_samples(self, docs: list[dict]) -> None:
        """Store a round's samples."""
        ...

    async def samples(self, ip: str, start: datetime, end: datetime) -> list[dict]:
        """Samples of ``ip`` with ``start <= t < end``, oldest first."""
        ...

    async def prune(self, before: datetime) -> int:
        """Delete samples (and published lifecycle records) older than ``before``; return
        how many samples."""
        ...

    async def claim_event(self, host: str, emit: Emit) -> bool:
        """Record a lifecycle event; False when it was already published."""
        ...

    async def event_published(self, emit: Emit) -> None:
        """Mark a recorded lifecycle event as published."""
        ...

    async def unpublished(self, host: str, older_than_s: float) -> list[Emit]:
        """Lifecycle events of ``host`` recorded over ``older_than_s`` ago and never published."""
        ...

    async def last_event_ns(self, host: str) -> int:
        """The time of the last Docker event this host handled (0: none)."""
        ...

    async def save_tracks(self, host: str, tracks: list[dict]) -> None:
        """Store the lifecycle tracker's state of this host."""
        ...

    async def load_tracks(self, host: str) -> list[dict] | None:
        """The stored tracker state, or None when this host never stored one."""
        ...

    async def set_last_event_ns(self, host: str, time_ns: int) -> None:
        """Remember the replay point of this host."""
        ...


_PROJECTION = {
    "_id": 0, "t": 1, "machine_id": 1, "cpu_percent": 1, "mem_usage": 1,
    "mem_working_set": 1, "mem_limit": 1, "pids": 1, "d": 1,
}


class MongoSampleStore:
    """:class:`SampleStore` on the MongoDB API (FerretDB-compatible operations only)."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._db = db

    @translate_errors
    async def setup(self) -> None:
        """Index samples by (ip, t) and by t (for retention)."""
        await ensure_indexes(
            self._db,
            {
                _SAMPLES: [
                    IndexModel([("ip", ASCENDING), ("t", ASCENDING)], name="ip_t"),
                    IndexModel([("t", ASCENDING)], name="t"),
                ],
                _LIFECYCLE: [IndexModel([("machine_id", ASCENDING), ("at", ASCENDING)],
                                        name="machine_at")],
            },
        )

    @translate_errors
    async def add_samples(self, docs: list[dict]) -> None:
        """Insert a round's samples in one call."""
        if docs:
            await self._db[_SAMPLES].insert_many([dict(d) for d in docs], ordered=False)

    @translate_errors
    async def samples(self, ip: str, start: datetime, end: datetime) -> list[dict]:
        """Samples of ``ip`` in ``[start, end)``, oldest first."""
        cursor = self._db[_SAMPLES].find(
            {"ip": ip, "t": {"$gte": start, "$lt": end}}, _PROJECTION
        ).sort("t", ASCENDING)
        return [doc async for doc in cursor]

    @translate_errors
    async def prune(self, before: datetime) -> int:
        """Delete samples older than ``before``, and the published lifecycle records too."""
        res = await self._db[_SAMPLES].delete_many({"t": {"$lt": before}})
        await self._db[_LIFECYCLE].delete_many(
            {"published": True, "recorded_at": {"$lt": before}}
        )
        return res.deleted_count

    @translate_errors
    async def claim_event(self, host: str, emit: Emit) -> bool:
        """Insert the event; an existing one is ours again only if it never went out."""
        msg = emit.message
        doc = {"_id": emit.id, "type": msg.TYPE, "host": host, "published": False,
               "recorded_at": datetime.now(UTC),
               **msg.model_dump(mode="python", exclude={"ip"}),
               "ip": str(getattr(msg, "ip", None) or "") or None}
        try:
            await self._db[_LIFECYCLE].insert_one(doc)
            return True
        except DuplicateKeyError:
            old = await self._db[_LIFECYCLE].find_one({"_id": emit.id}, {"published": 1})
            return old is None or not old.get("published")

    @translate_errors
    async def event_published(self, emit: Emit) -> None:
        """Mark it published."""
        await self._db[_LIFECYCLE].update_one({"_id": emit.id}, {"$set": {"published": True}})

    @translate_errors
    async def unpublished(self, host: str, older_than_s: float) -> list[Emit]:
        """Rebuild the messages of events never marked published."""
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
        cursor = self._db[_LIFECYCLE].find(
            {"host": host, "published": False, "recorded_at": {"$lt": cutoff}}
        ).limit(1000)
        return [_emit(doc) async for doc in cursor]

    @translate_errors
    async def last_event_ns(self, host: str) -> int:
        """The host's replay point."""
        doc = await self._db[_STATE].find_one({"_id": host})
        return int(doc["last_event_ns"]) if doc else 0

    @translate_errors
    async def save_tracks(self, host: str, tracks: list[dict]) -> None:
        """Replace the host's tracker state."""
        await self._db[_STATE].update_one({"_id": host}, {"$set": {"tracks": tracks}},
                                          upsert=True)

    @translate_errors
    async def load_tracks(self, host: str) -> list[dict] | None:
        """The host's tracker state."""
        doc = await self._db[_STATE].find_one({"_id": host}, {"tracks": 1})
        return None if doc is None or "tracks" not in doc else list(doc["tracks"])

    @translate_errors
    async def set_last_event_ns(self, host: str, time_ns: int) -> None:
        """Move the host's replay point forward (never back)."""
        await self._db[_STATE].update_one(
            {"_id": host}, {"$max": {"last_event_ns": time_ns}}, upsert=True
        )


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
        """Keep copies."""
        self.docs.extend(dict(d) for d in docs)

    async def samples(self, ip: str, start: datetime, end: datetime) -> list[dict]:
        """Filter and sort like the real store."""
        found = [d for d in self.docs if d["ip"] == ip and start <= _aware(d["t"]) < end]
        return sorted(found, key=lambda d: d["t"])

    async def prune(self, before: datetime) -> int:
        """Drop old docs."""
        keep = [d for d in self.docs if _aware(d["t"]) >= before]
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


def _emit(doc: dict) -> Emit:
    """The :class:`Emit` a lifecycle document was recorded from."""
    model = message_model(doc["type"])
    fields = {k: v for k, v in doc.items() if k in model.model_fields}
    return Emit(doc["_id"], model.model_validate(fields))


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)


