"""What hosts report of their orphans: quarantined machines and host alerts, as the gateway last
heard them (the agents keep the truth on their hosts; this is the view ``GET /v1/hosts/{id}``
shows).

Every document is written once and never updated, keyed by what it reports and when:

- ``host_quarantine``: one per quarantine, ``_id`` ``<host>/<machine_id>/<quarantined_at>``;
  agents repeat ``container.quarantined`` every reconcile, and a repeat is the same document;
- ``host_quarantine_ends``: one per end (``released`` or ``purged``), ``_id``
  ``<host>/<machine_id>/<at>``; a quarantine is over once an end at or after its start exists;
- ``host_alerts``: one per alert event, ``_id`` ``<host>/<reason>/<at>``; the latest of a
  (host, reason) is its state, shown unless ``cleared``.

How it copes with FerretDB v1: an update there is a read, then a whole-document write, so two
concurrent updates of one document lose one (the gateway handles events concurrently: a repeated
``container.quarantined`` may be handled at the same moment as the purge that ends it). Here
nothing is updated: every write is an insert under the unique ``_id`` (a repeat is a duplicate
key, ignored), and what holds is decided on reading, by the events' times. Superseded documents
(a quarantine before its end, older ends and alerts of the same key) are deleted after each
end or alert; they never change, so such a delete cannot remove anything that still counts.
Listing a host's documents scans the collections (FerretDB pushes no filter down): they are few
and small.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NotRequired, TypedDict

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.db import read_all
from libs.common.errors import translate_errors

__all__ = [
    "HOST_ALERTS",
    "HOST_QUARANTINE",
    "HOST_QUARANTINE_ENDS",
    "AlertDoc",
    "QuarantineDoc",
    "QuarantineStore",
]

HOST_QUARANTINE, HOST_QUARANTINE_ENDS, HOST_ALERTS = (
    "host_quarantine",
    "host_quarantine_ends",
    "host_alerts",
)


class QuarantineDoc(TypedDict):
    """A machine a host quarantined, as its ``container.quarantined`` said."""

    host: str
    machine_id: str
    quarantined_at: datetime
    container_id: NotRequired[str | None]
    was_running: NotRequired[bool]
    purge_after: NotRequired[datetime]
    cluster_id: NotRequired[str | None]


class AlertDoc(TypedDict):
    """A host's alert of one reason at one time."""

    host: str
    reason: str
    detail: str
    count: int
    cleared: bool
    at: datetime


async def _insert(coll: AsyncCollection[Any], doc: dict[str, Any]) -> bool:
    """Insert ``doc``; False when its ``_id`` is there already (a repeat)."""
    try:
        await coll.insert_one(doc)
    except DuplicateKeyError:
        return False
    return True


class QuarantineStore:
    """Per-host quarantines, their ends and alerts: inserted, never updated."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.quarantines = db[HOST_QUARANTINE]
        self.ends = db[HOST_QUARANTINE_ENDS]
        self.alerts = db[HOST_ALERTS]

    async def _last_end(self, host: str, machine_id: str) -> datetime | None:
        ends = await read_all(self.ends.find({"host": host, "machine_id": machine_id}))
        return max((e["at"] for e in ends), default=None)

    @translate_errors
    async def add_quarantine(self, doc: QuarantineDoc) -> bool:
        """Record a quarantine; False if it is a repeat or already over."""
        end = await self._last_end(doc["host"], doc["machine_id"])
        if end is not None and end >= doc["quarantined_at"]:
            return False
        key = f"{doc['host']}/{doc['machine_id']}/{doc['quarantined_at'].isoformat()}"
        return await _insert(self.quarantines, {"_id": key, **doc})

    @translate_errors
    async def add_end(self, host: str, machine_id: str, state: str, at: datetime) -> None:
        """Record that the machine's quarantine ended at ``at`` (``released``, ``purged``)."""
        key = f"{host}/{machine_id}/{at.isoformat()}"
        doc = {"_id": key, "host": host, "machine_id": machine_id, "state": state, "at": at}
        await _insert(self.ends, doc)
        mine = {"host": host, "machine_id": machine_id}
        await self.quarantines.delete_many({**mine, "quarantined_at": {"$lte": at}})
        await self.ends.delete_many({**mine, "at": {"$lt": at}})

    @translate_errors
    async def quarantined(self, host: str) -> list[QuarantineDoc]:
        """The host's machines in quarantine now (the latest quarantine of each, not ended)."""
        ends: dict[str, datetime] = {}
        for e in await read_all(self.ends.find({"host": host})):
            ends[e["machine_id"]] = max(e["at"], ends.get(e["machine_id"], e["at"]))
        live: dict[str, QuarantineDoc] = {}
        for q in await read_all(self.quarantines.find({"host": host})):
            mid, at = q["machine_id"], q["quarantined_at"]
            if mid in ends and ends[mid] >= at:
                continue
            if mid not in live or live[mid]["quarantined_at"] < at:
                live[mid] = q
        return [live[mid] for mid in sorted(live)]

    @translate_errors
    async def alert(self, doc: AlertDoc) -> bool:
        """Record a host's alert; False if a later one of its reason is there already."""
        mine = {"host": doc["host"], "reason": doc["reason"]}
        latest = await read_all(self.alerts.find(mine))
        if any(a["at"] > doc["at"] for a in latest):
            return False
        written = await _insert(self.alerts, {"_id": self._alert_key(doc), **doc})
        await self.alerts.delete_many({**mine, "at": {"$lt": doc["at"]}})
        return written

    @staticmethod
    def _alert_key(doc: AlertDoc) -> str:
        return f"{doc['host']}/{doc['reason']}/{doc['at'].isoformat()}"

    @translate_errors
    async def alerts_of(self, host: str) -> list[AlertDoc]:
        """The host's latest alert of each reason, unless it was cleared; by reason."""
        latest: dict[str, AlertDoc] = {}
        for a in await read_all(self.alerts.find({"host": host})):
            if a["reason"] not in latest or latest[a["reason"]]["at"] < a["at"]:
                latest[a["reason"]] = a
        return [latest[r] for r in sorted(latest) if not latest[r]["cleared"]]
