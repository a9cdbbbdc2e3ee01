"""The monitor's history in MongoDB: samples keyed by IP and time, and lifecycle events.

Collections:
Every multi-document read completes in one batch (``read_all``): an open FerretDB cursor holds
one of its SQLite connections until it is exhausted or killed.

- ``hist.<ip>.<YYYYMMDD>``: the samples of one IP for one UTC day, one small document per
  sample ``{_id: <t iso>, t, machine_id, cpu_percent, mem_*, pids, d}`` (``d``: the counter
  deltas since the previous sample; only the fields a ``metrics.query`` serves are kept).
  FerretDB v1 (SQLite) scans the whole table for every query but an exact ``_id`` lookup, and
  even that costs time in proportion to the table's size (measured), so a query's cost is
  bounded by giving each (IP, day) its own table: a query reads the one to eight tables its
  range covers, whatever the rest of the history holds. Writes are plain inserts (the ``_id``
  makes a repeated round a no-op); retention drops whole past days' tables and trims the day
  the cutoff falls in. Samples outlive their container: the history of an IP stays queryable
  after a destroy.
- ``lifecycle``: one document per lifecycle event, ``_id`` = its deterministic envelope id; the
  unique ``_id`` is what makes a replayed event publish once across monitor restarts.
- ``monitor_state``: per host, the time of the last Docker event handled (the replay point)
  and the lifecycle tracker's state, so a restarted monitor resumes where it stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Protocol

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from libs.common.clock import utcnow
from libs.common.contracts.envelope import message_model
from libs.common.contracts.monitor import ContainerSample
from libs.common.db import ensure_indexes, read_all
from libs.common.errors import translate_errors

from .domain import Emit

__all__ = ["MongoSampleStore", "SampleStore", "assume_utc", "history_collection", "sample_doc"]

_LIFECYCLE, _STATE = "lifecycle", "monitor_state"
_HIST = "hist."
_CONCURRENCY = 8  # parallel table reads/writes: enough to hide round trips on 2 cores


def sample_doc(host: str, sample: ContainerSample, deltas: Mapping[str, int | float]) -> dict:
    """The stored form of a sample."""
    doc = sample.model_dump(mode="python", exclude={"at", "ip"})
    doc.update(ip=str(sample.ip) if sample.ip else None, t=sample.at, host=host, d=dict(deltas))
    return doc


def history_collection(ip: str, t: datetime) -> str:
    """The collection holding the samples of ``ip`` on the UTC day of ``t``."""
    return f"{_HIST}{ip}.{assume_utc(t).astimezone(UTC):%Y%m%d}"


def _days(start: datetime, end: datetime) -> list[datetime]:
    """Midnights (UTC) of every day overlapping ``[start, end)``."""
    day = assume_utc(start).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    out = []
    while day < assume_utc(end):
        out.append(day)
        day += timedelta(days=1)
    return out


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


_FIELDS = (
    "t",
    "machine_id",
    "cpu_percent",
    "mem_usage",
    "mem_working_set",
    "mem_limit",
    "pids",
    "d",
)


class MongoSampleStore:
    """:class:`SampleStore` on the MongoDB API (FerretDB-compatible operations only)."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._db = db

    @translate_errors
    async def setup(self) -> None:
        """Index lifecycle records; history tables need none (each is one IP's day)."""
        await ensure_indexes(
            self._db,
            {
                _LIFECYCLE: [
                    IndexModel([("machine_id", ASCENDING), ("at", ASCENDING)], name="machine_at")
                ]
            },
        )

    @translate_errors
    async def add_samples(self, docs: list[dict]) -> None:
        """Insert each sample into its IP's day table; a sample stored already is skipped."""
        by_table: dict[str, list[dict]] = {}
        for doc in docs:
            if not doc.get("ip"):  # no IP, no way to query it: not kept
                continue
            t = assume_utc(doc["t"])
            kept = {k: doc[k] for k in _FIELDS if k in doc}
            by_table.setdefault(history_collection(doc["ip"], t), []).append(
                {"_id": t.isoformat(), **kept}
            )
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def insert(name: str, rows: list[dict]) -> None:
            async with gate:
                try:
                    await self._db[name].insert_many(rows, ordered=False)
                except BulkWriteError as err:  # only duplicates (a replayed round) are fine
                    if any(e.get("code") != 11000 for e in err.details.get("writeErrors", [])):
                        raise

        await asyncio.gather(*(insert(n, rows) for n, rows in by_table.items()))

    @translate_errors
    async def samples(self, ip: str, start: datetime, end: datetime) -> list[dict]:
        """Samples of ``ip`` in ``[start, end)``, oldest first, read from its days' tables."""
        gate = asyncio.Semaphore(_CONCURRENCY)
        span = {"t": {"$gte": start, "$lt": end}}

        async def read(day: datetime) -> list[dict]:
            async with gate:
                return await read_all(self._db[history_collection(ip, day)].find(span, {"_id": 0}))

        parts = await asyncio.gather(*(read(d) for d in _days(start, end)))
        return sorted((doc for part in parts for doc in part), key=lambda d: d["t"])

    @translate_errors
    async def prune(self, before: datetime) -> int:
        """Delete samples older than ``before`` (past days' tables dropped whole, the
        cutoff's day trimmed), and the published lifecycle records too."""
        cutoff = f"{assume_utc(before).astimezone(UTC):%Y%m%d}"
        deleted = 0
        for name in await self._db.list_collection_names():
            if not name.startswith(_HIST):
                continue
            day = name.rpartition(".")[2]
            if day < cutoff:
                deleted += await self._db[name].count_documents({})
                await self._db.drop_collection(name)
            elif day == cutoff:
                res = await self._db[name].delete_many({"t": {"$lt": before}})
                deleted += res.deleted_count
        await self._db[_LIFECYCLE].delete_many({"published": True, "recorded_at": {"$lt": before}})
        return deleted

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
