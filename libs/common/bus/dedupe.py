"""Idempotent-consumer bookkeeping: which message ids a consumer has already handled.

A claim is a document ``{_id: "<consumer>:<message id>", state, at}`` under a unique ``_id``,
so two replicas (or two deliveries in one process) cannot both win it. A claim left by a
crashed worker expires after ``lease_s`` and can then be taken over.
"""

from __future__ import annotations

from datetime import UTC, timedelta
from enum import StrEnum
from typing import Protocol

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from ..clock import utcnow

__all__ = ["Claim", "Dedupe", "MongoDedupe"]


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
        """Record the id as handled."""
        await self._coll.update_one(
            {"_id": self._key(message_id)}, {"$set": {"state": "done", "at": utcnow()}}, upsert=True
        )

    async def release(self, message_id: str) -> None:
        """Drop the claim so a redelivery can handle it."""
        await self._coll.delete_one({"_id": self._key(message_id), "state": "processing"})

    async def prune(self, older_than: timedelta) -> int:
        """Forget handled ids older than ``older_than``; return how many."""
        res = await self._coll.delete_many({"state": "done", "at": {"$lt": utcnow() - older_than}})
        return res.deleted_count
