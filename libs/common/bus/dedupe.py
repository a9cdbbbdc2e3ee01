"""Idempotent-consumer bookkeeping: which message ids a consumer has already handled.

A claim is a document ``{_id: "<consumer>:<message id>", state, at}`` under a unique ``_id``,
so two replicas (or two deliveries in one process) cannot both win it. A claim left by a
crashed worker expires after ``lease_s`` and can then be taken over.

Handled is a second document, ``{_id: "<claim id>#done"}``, inserted rather than the claim
updated: on FerretDB v1 an update costs time in proportion to the collection (7.5 ms of its
CPU per update at 2,000 documents here, against 0.3 ms for an insert), and this collection
holds a week of messages. A claim (and its mark) older than the retention is pruned whatever
its state. Claims written as ``state: done`` by earlier versions are still read as handled.
"""

from __future__ import annotations

from datetime import UTC, timedelta
from enum import StrEnum
from typing import Protocol

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from ..clock import utcnow

__all__ = ["Claim", "Dedupe", "MongoDedupe"]

_DONE = "#done"  # suffix of the id of a handled message's mark


class Claim(StrEnum):
    """The outcome of claiming a message id."""

    NEW = "new"  # ours to handle
    DONE = "done"  # already handled: ack and skip
    BUSY = "busy"  # another worker holds it right now: requeue


class Dedupe(Protocol):
    """Port: remember handled message ids."""

    async def claim(self, message_id: str) -> Claim:
        """Try to take ``message_id`` for handling."""
        ...

    async def complete(self, message_id: str) -> None:
        """Mark ``message_id`` handled for good."""
        ...

    async def release(self, message_id: str) -> None:
        """Give ``message_id`` back (the handling failed and may be retried)."""
        ...


class MongoDedupe:
    """:class:`Dedupe` on a MongoDB collection shared by every replica of a consumer."""

    def __init__(self, collection: AsyncCollection, consumer: str, lease_s: float = 60.0) -> None:
        self._coll = collection
        self._consumer = consumer
        self._lease = timedelta(seconds=lease_s)

    def _key(self, message_id: str) -> str:
        return f"{self._consumer}:{message_id}"

    async def claim(self, message_id: str) -> Claim:
        """Insert the claim; on a duplicate look at who holds it."""
        key, now = self._key(message_id), utcnow()
        try:
            await self._coll.insert_one({"_id": key, "state": "processing", "at": now})
            return Claim.NEW
        except DuplicateKeyError:
            pass
        if await self._coll.find_one({"_id": key + _DONE}, {"_id": 1}) is not None:
            return Claim.DONE
        doc = await self._coll.find_one({"_id": key})
        if doc is None:  # released between our insert and find: try once more
            return await self.claim(message_id)
        if doc["state"] == "done":
            return Claim.DONE
        at = doc["at"] if doc["at"].tzinfo else doc["at"].replace(tzinfo=UTC)
        if now - at < self._lease:
            return Claim.BUSY
        taken = await self._coll.find_one_and_update(
            {"_id": key, "state": "processing", "at": doc["at"]}, {"$set": {"at": now}}
        )
        return Claim.NEW if taken is not None else Claim.BUSY

    async def complete(self, message_id: str) -> None:
        """Record the id as handled (an insert; a second one finds it there and is a no-op)."""
        try:
            await self._coll.insert_one(
                {"_id": self._key(message_id) + _DONE, "state": "done", "at": utcnow()}
            )
        except DuplicateKeyError:
            pass

    async def release(self, message_id: str) -> None:
        """Drop the claim so a redelivery can handle it."""
        await self._coll.delete_one({"_id": self._key(message_id), "state": "processing"})

    async def prune(self, older_than: timedelta) -> int:
        """Forget handled ids older than ``older_than``; return how many."""
        # Claims too, whatever their state: a lease of seconds is long over, and a handled
        # message's claim stays beside its mark.
        res = await self._coll.delete_many({"at": {"$lt": utcnow() - older_than}})
        return res.deleted_count
