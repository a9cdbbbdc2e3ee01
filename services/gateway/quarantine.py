"""What hosts report of their orphans: quarantined machines and host alerts, as the gateway last
heard them (the agents keep the truth on their hosts; this is the view ``GET /v1/hosts/{id}``
shows).

``host_quarantine`` holds one document per (host, machine): ``_id`` ``<host>/<machine_id>``, its
``state`` ``quarantined``, ``released`` or ``purged`` (the last two are tombstones), and ``at``,
the time of the event that wrote it. ``host_alerts`` holds one per (host, reason).

How it copes with FerretDB v1: every write replaces one small document whole, keyed by ``_id``,
and only if the event is not older than the one that wrote the document (``at``): the gateway
handles events concurrently, so a repeated ``container.quarantined`` (agents repeat it every
reconcile) may be handled after the ``container.destroyed`` that ended it; the tombstone's later
``at`` keeps the machine purged. Two writes of one document at the same moment can still both
pass the check (FerretDB matches, then writes): the later one wins, and an agent's next repeat
puts a live quarantine right within a reconcile. Listing a host's documents scans the collection
(FerretDB pushes no filter down): they are few and small.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NotRequired, TypedDict

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.db import read_all
from libs.common.errors import translate_errors

__all__ = ["HOST_ALERTS", "HOST_QUARANTINE", "AlertDoc", "QuarantineDoc", "QuarantineStore"]

HOST_QUARANTINE, HOST_ALERTS = "host_quarantine", "host_alerts"


class QuarantineDoc(TypedDict):
    """A machine a host quarantined (or, as a tombstone, released or purged)."""

    _id: str
    host: str
    machine_id: str
    state: str
    at: datetime
    container_id: NotRequired[str | None]
    was_running: NotRequired[bool]
    quarantined_at: NotRequired[datetime]
    purge_after: NotRequired[datetime]
    cluster_id: NotRequired[str | None]


class AlertDoc(TypedDict):
    """A host's latest alert of one reason."""

    _id: str
    host: str
    reason: str
    detail: str
    count: int
    cleared: bool
    at: datetime


class QuarantineStore:
    """Per-host quarantined machines and alerts, each written only by a newer event."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.quarantine = db[HOST_QUARANTINE]
        self.alerts = db[HOST_ALERTS]

    async def _newer(self, coll: Any, doc: dict[str, Any]) -> bool:
        """Replace ``doc`` by ``_id`` unless the stored one was written by a later event."""
        current = await coll.find_one({"_id": doc["_id"]})
        if current is not None and current["at"] > doc["at"]:
            return False
        if current is None:
            try:
                await coll.insert_one(doc)
                return True
            except DuplicateKeyError:
                return await self._newer(coll, doc)  # another event's insert won: compare
        res = await coll.replace_one({"_id": doc["_id"], "at": current["at"]}, doc)
        return res.matched_count > 0

    @translate_errors
    async def record(self, doc: QuarantineDoc) -> bool:
        """Write a machine's quarantine state (``quarantined``, ``released``, ``purged``)."""
        return await self._newer(self.quarantine, dict(doc))

    @translate_errors
    async def quarantined(self, host: str) -> list[QuarantineDoc]:
        """The host's machines in quarantine now, by machine id."""
        docs = await read_all(self.quarantine.find({"host": host, "state": "quarantined"}))
        return sorted(docs, key=lambda d: d["machine_id"])

    @translate_errors
    async def get(self, host: str, machine_id: str) -> QuarantineDoc | None:
        """One machine's document, or None."""
        return await self.quarantine.find_one({"_id": f"{host}/{machine_id}"})

    @translate_errors
    async def alert(self, doc: AlertDoc) -> bool:
        """Write a host's latest alert of its reason."""
        return await self._newer(self.alerts, dict(doc))

    @translate_errors
    async def alerts_of(self, host: str) -> list[AlertDoc]:
        """The host's alerts not cleared, by reason."""
        docs = await read_all(self.alerts.find({"host": host, "cleared": False}))
        return sorted(docs, key=lambda d: d["reason"])
