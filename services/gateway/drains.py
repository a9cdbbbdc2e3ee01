"""Drained hosts: placement puts nothing new on them (``POST /v1/hosts/{id}/drain``).

One document per drained host (``_id`` = host id) in its own collection, not a field of the host
document: every heartbeat rewrites that document, and FerretDB v1 runs an update as a read then
a whole-document write, so a drain written there could be lost to a heartbeat. Here drain is an
insert (the unique ``_id`` decides between two at once) and undrain a delete; nobody updates.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.db import read_all
from libs.common.errors import translate_errors

__all__ = ["HOST_DRAINS", "DrainStore", "MemoryDrainStore"]

HOST_DRAINS = "host_drains"


class DrainStore:
    """Drained hosts in MongoDB."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.coll = db[HOST_DRAINS]

    @translate_errors
    async def drained(self) -> dict[str, dict[str, Any]]:
        """Every drained host: who drained it and when."""
        return {d["_id"]: d for d in await read_all(self.coll.find({}))}

    @translate_errors
    async def drain(self, host_id: str, by: str, at: datetime) -> bool:
        """Drain the host; False when it was drained already."""
        try:
            await self.coll.insert_one({"_id": host_id, "by": by, "at": at})
        except DuplicateKeyError:
            return False
        return True

    @translate_errors
    async def undrain(self, host_id: str) -> bool:
        """Undrain the host; False when it was not drained."""
        return (await self.coll.delete_one({"_id": host_id})).deleted_count == 1


class MemoryDrainStore:
    """Drained hosts in a dict (:class:`DrainStore`)."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}

    async def drained(self) -> dict[str, dict[str, Any]]:
        """Every drained host: who drained it and when."""
        return {k: dict(v) for k, v in self.docs.items()}

    async def drain(self, host_id: str, by: str, at: datetime) -> bool:
        """Drain the host; False when it was drained already."""
        if host_id in self.docs:
            return False
        self.docs[host_id] = {"_id": host_id, "by": by, "at": at}
        return True

    async def undrain(self, host_id: str) -> bool:
        """Undrain the host; False when it was not drained."""
        return self.docs.pop(host_id, None) is not None
