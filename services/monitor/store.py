"""The monitor's history in MongoDB: samples keyed by IP and time, and lifecycle events.

Collections:
- ``sample_buckets``: one document per IP per hour, ``_id = "<ip>|<YYYYMMDDHH>"``, holding that
  hour's samples as an array of sub-documents ``s: [{t, host, machine_id, ..., d}]`` (``d``: the
  counter deltas since the previous sample) and their count ``n``. FerretDB v1 (SQLite) uses an
  index only for an exact ``_id`` lookup (``$in``, ranges and secondary indexes scan the whole
  collection), so a query computes the ids of the hours it covers and fetches each one by
  ``_id``; a round writes one ``$push`` upsert per IP. Samples outlive their container: the
  history of an IP stays queryable after a destroy.
- ``sample_hours``: one small document per hour, ``_id = "<YYYYMMDDHH>"``, listing the IPs with
  a bucket that hour; retention (:meth:`SampleStore.prune`, an explicit job since FerretDB v1
  has no TTL index) reads this short collection to find the buckets to delete by ``_id``.
- ``lifecycle``: one document per lifecycle event, ``_id`` = its deterministic envelope id; the
  unique ``_id`` is what makes a replayed event publish once across monitor restarts.
- ``monitor_state``: per host, the time of the last Docker event handled (the replay point)
  and the lifecycle tracker's state, so a restarted monitor resumes where it stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.contracts.envelope import message_model
from libs.common.contracts.monitor import ContainerSample
from libs.common.db import ensure_indexes
from libs.common.errors import translate_errors

from .domain import Emit

__all__ = [
    "MemorySampleStore", "MongoSampleStore", "SampleStore", "bucket_id", "hour_key", "sample_doc",
]

_BUCKETS, _HOURS, _LIFECYCLE, _STATE = (
    "sample_buckets", "sample_hours", "lifecycle", "monitor_state",
)
_FETCH_CONCURRENCY = 8  # parallel _id lookups of one query: enough to hide the round trips
_HOUR = timedelta(hours=1)


def sample_doc(host: str, sample: ContainerSample, deltas: Mapping[str, int | float]) -> dict:
    """The stored form of a sample."""
    doc = sample.model_dump(mode="python", exclude={"at", "ip"})
    doc.update(ip=str(sample.ip) if sample.ip else None, t=sample.at, host=host, d=dict(deltas))
    return doc


def hour_key(t: datetime) -> str:
    """The hour of ``t`` (UTC) as ``YYYYMMDDHH``; sorts like time."""
    return _aware(t).astimezone(UTC).strftime("%Y%m%d%H")


def bucket_id(ip: str, t: datetime) -> str:
    """The ``_id`` of the bucket holding the samples of ``ip`` in the hour of ``t``."""
    return f"{ip}|{hour_key(t)}"


def _hours(start: datetime, end: datetime) -> list[datetime]:
    """The hour starts of every hour overlapping ``[start, end)``."""
    first = _aware(start).astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    end = _aware(end)
    out = []
    while first < end:
        out.append(first)
        first += _HOUR
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


_FIELDS = ("t", "machine_id", "cpu_percent", "mem_usage", "mem_working_set", "mem_limit",
           "pids", "d")


class MongoSampleStore:
    """:class:`SampleStore` on the MongoDB API (FerretDB-compatible operations only)."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._db = db

    @translate_errors
    async def setup(self) -> None:
        """Index lifecycle records; buckets need none (every read is by ``_id``)."""
        await ensure_indexes(
            self._db,
            {_LIFECYCLE: [IndexModel([("machine_id", ASCENDING), ("at", ASCENDING)],
                                     name="machine_at")]},
        )

    @translate_errors
    async def add_samples(self, docs: list[dict]) -> None:
        """Append each sample to its IP's hour bucket (one upsert per IP) and record which
        IPs have a bucket in which hours."""
        by_bucket: dict[str, list[dict]] = {}
        hours: dict[str, set[str]] = {}
        for doc in docs:
            ip = doc.get("ip")
            if not ip:  # no IP, no way to query it: not kept
                continue
            sub = {k: v for k, v in doc.items() if k != "ip"}
            by_bucket.setdefault(bucket_id(ip, doc["t"]), []).append(sub)
            hours.setdefault(hour_key(doc["t"]), set()).add(ip)
        if not by_bucket:
            return
        # The hour index first: a bucket is then always found by retention.
        await self._db[_HOURS].bulk_write(
            [UpdateOne({"_id": h}, {"$addToSet": {"ips": {"$each": sorted(ips)}}}, upsert=True)
             for h, ips in sorted(hours.items())],
            ordered=False,
        )
        await self._db[_BUCKETS].bulk_write(
            [UpdateOne({"_id": bid},
                       {"$push": {"s": {"$each": subs}}, "$inc": {"n": len(subs)},
                        "$setOnInsert": {"ip": bid.rpartition("|")[0]}},
                       upsert=True)
             for bid, subs in by_bucket.items()],
            ordered=False,
        )

    @translate_errors
    async def samples(self, ip: str, start: datetime, end: datetime) -> list[dict]:
        """Samples of ``ip`` in ``[start, end)``, oldest first: one ``_id`` lookup per hour."""
        gate = asyncio.Semaphore(_FETCH_CONCURRENCY)

        async def fetch(hour: datetime) -> dict | None:
            async with gate:
                return await self._db[_BUCKETS].find_one({"_id": bucket_id(ip, hour)}, {"s": 1})

        buckets = await asyncio.gather(*(fetch(h) for h in _hours(start, end)))
        lo, hi = _aware(start), _aware(end)
        found = [
            {k: sub[k] for k in _FIELDS if k in sub}
            for bucket in buckets if bucket
            for sub in bucket.get("s", [])
            if lo <= _aware(sub["t"]) < hi
        ]
        return sorted(found, key=lambda d: d["t"])

    @translate_errors
    async def prune(self, before: datetime) -> int:
        """Delete samples older than ``before``, and the published lifecycle records too.

        Whole hours go by ``_id``; in the hour ``before`` falls in, each bucket is rewritten
        without its older samples, only if no sample was added meanwhile (else next time)."""
        cutoff = hour_key(before)
        hours = self._db[_HOURS]
        buckets = self._db[_BUCKETS]
        deleted = 0
        async for hour in hours.find({"_id": {"$lte": cutoff}}):  # a short collection
            for ip in hour.get("ips", []):
                bid = f"{ip}|{hour['_id']}"
                if hour["_id"] < cutoff:
                    # No write reaches an hour this old, so counting then deleting is exact
                    # (FerretDB v1's findAndModify takes no projection).
                    doc = await buckets.find_one({"_id": bid}, {"n": 1})
                    res = await buckets.delete_one({"_id": bid})
                    deleted += int(doc.get("n", 0)) if doc and res.deleted_count else 0
                    continue
                doc = await buckets.find_one({"_id": bid})
                if doc is None:
                    continue
                keep = [sub for sub in doc.get("s", []) if _aware(sub["t"]) >= _aware(before)]
                if len(keep) == len(doc.get("s", [])):
                    continue
                res = await buckets.update_one(
                    {"_id": bid, "n": doc.get("n", 0)}, {"$set": {"s": keep, "n": len(keep)}}
                )
                deleted += (len(doc.get("s", [])) - len(keep)) if res.modified_count else 0
            if hour["_id"] < cutoff:
                await hours.delete_one({"_id": hour["_id"]})
        await self._db[_LIFECYCLE].delete_many(
            {"published": True, "recorded_at": {"$lt": before}}
        )
        return deleted

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


