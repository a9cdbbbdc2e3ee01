"""The monitor's state in MongoDB: lifecycle events and each host's replay point.

Samples are not kept here: Prometheus scrapes each monitor's ``/metrics`` and keeps the history
(the gateway reads it back for ``GET /v1/ips/{ip}/metrics``). What only dockvm knows stays:

Every multi-document read completes in one batch (``read_all``): an open FerretDB cursor holds
one of its SQLite connections until it is exhausted or killed.

- ``lifecycle``: one document per lifecycle event, ``_id`` = its deterministic envelope id; the
  unique ``_id`` is what makes a replayed event publish once across monitor restarts (FerretDB
  v1 may lose one of two concurrent updates of a document; an insert under the unique ``_id``
  is the only arbiter, and each host's monitor writes only its own events).
- ``monitor_state``: per host, the time of the last Docker event handled (the replay point)
  and the lifecycle tracker's state, so a restarted monitor resumes where it stopped; one
  document per host, one writer each.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.clock import utcnow
from libs.common.contracts.envelope import message_model
from libs.common.db import ensure_indexes, read_all
from libs.common.errors import translate_errors

from .domain import Emit

__all__ = ["MongoMonitorStore", "MonitorStore", "assume_utc"]

_LIFECYCLE, _STATE = "lifecycle", "monitor_state"


class MonitorStore(Protocol):
    """Port: lifecycle events and the replay state of each host."""

    async def setup(self) -> None:
        """Create indexes."""
        ...

    async def prune(self, before: datetime) -> int:
        """Delete published lifecycle records older than ``before``; return how many."""
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


class MongoMonitorStore:
    """:class:`MonitorStore` on the MongoDB API (FerretDB-compatible operations only)."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._db = db

    @translate_errors
    async def setup(self) -> None:
        """Index lifecycle records."""
        await ensure_indexes(
            self._db,
            {
                _LIFECYCLE: [
                    IndexModel([("machine_id", ASCENDING), ("at", ASCENDING)], name="machine_at")
                ]
            },
        )

    @translate_errors
    async def prune(self, before: datetime) -> int:
        """Delete the published lifecycle records older than ``before``."""
        query = {"published": True, "recorded_at": {"$lt": before}}
        res = await self._db[_LIFECYCLE].delete_many(query)
        return res.deleted_count

    @translate_errors
    async def claim_event(self, host: str, emit: Emit) -> bool:
        """Insert the event; an existing one is ours again only if it never went out."""
        msg = emit.message
        doc = {
            "_id": emit.id,
            "type": msg.TYPE,
            "host": host,
            "published": False,
            "recorded_at": utcnow(),
            **msg.model_dump(mode="python", exclude={"ip"}),
            "ip": str(getattr(msg, "ip", None) or "") or None,
        }
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
        cutoff = utcnow() - timedelta(seconds=older_than_s)
        query = {"host": host, "published": False, "recorded_at": {"$lt": cutoff}}
        return [_emit(doc) for doc in await read_all(self._db[_LIFECYCLE].find(query).limit(1000))]

    @translate_errors
    async def last_event_ns(self, host: str) -> int:
        """The host's replay point."""
        doc = await self._db[_STATE].find_one({"_id": host})
        return int(doc.get("last_event_ns", 0)) if doc else 0

    @translate_errors
    async def save_tracks(self, host: str, tracks: list[dict]) -> None:
        """Replace the host's tracker state."""
        await self._db[_STATE].update_one({"_id": host}, {"$set": {"tracks": tracks}}, upsert=True)

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


def _emit(doc: dict) -> Emit:
    """The :class:`Emit` a lifecycle document was recorded from."""
    model = message_model(doc["type"])
    fields = {k: v for k, v in doc.items() if k in model.model_fields}
    return Emit(doc["_id"], model.model_validate(fields))


def assume_utc(t: datetime) -> datetime:
    """``t``, read as UTC when it carries no timezone (as pymongo returns BSON dates)."""
    return t if t.tzinfo else t.replace(tzinfo=UTC)
