"""The builder's documents on MongoDB / FerretDB v1.

``image_builds``: one document per build, written only by the builder that runs it. FerretDB v1
writes a whole document on every update, so two updates of one build at once would lose one:
this process orders its writes to a build under a per-build lock (the log flusher and the
pipeline both write it). The submit is an insert under the unique ``_id``: the same build
asked twice is stored once.

``image_build_logs``: one document per log chunk, ``_id = <build>:<seq>``, inserted once and
never updated (one writer, no lost appends); the build document's ``log_seq`` says how many
exist, so a reader asks for exactly the ids it lacks by ``_id``.
"""

from __future__ import annotations

import asyncio
import weakref
from datetime import timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.clock import utcnow
from libs.common.db import read_all
from libs.common.errors import TransientError

from .documents import BuildDoc

__all__ = ["MongoBuildStore", "chunk_id"]


def chunk_id(build_id: str, seq: int) -> str:
    """The ``_id`` of a log chunk."""
    return f"{build_id}:{seq:08d}"


class MongoBuildStore:
    """Builds and their log chunks."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.builds = db["image_builds"]
        self.logs = db["image_build_logs"]
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _lock(self, build_id: str) -> asyncio.Lock:
        lock = self._locks.get(build_id)
        if lock is None:
            lock = self._locks[build_id] = asyncio.Lock()
        return lock

    async def insert(self, doc: BuildDoc) -> BuildDoc:
        """Store a new build; the existing one if its id is taken (idempotent submit)."""
        try:
            await self.builds.insert_one(dict(doc))
            return doc
        except DuplicateKeyError:
            existing = await self.get(doc["_id"])
            if existing is None:
                raise TransientError(f"build {doc['_id']}: taken, then not found") from None
            return existing

    async def get(self, build_id: str) -> BuildDoc | None:
        """One build."""
        return await self.builds.find_one({"_id": build_id})  # type: ignore[return-value]

    async def update(self, build_id: str, fields: dict[str, Any]) -> None:
        """Set fields of a build."""
        async with self._lock(build_id):
            await self.builds.update_one({"_id": build_id}, {"$set": fields})

    async def list(self, state: str | None, name: str | None, limit: int) -> list[BuildDoc]:
        """Builds, newest first (filters and order applied here: FerretDB scans anyway)."""
        flt: dict[str, Any] = {}
        if state:
            flt["state"] = state
        if name:
            flt["name"] = name
        docs = await read_all(self.builds.find(flt, {"policy": 0}))
        docs.sort(key=lambda d: (d["created_at"], d["_id"]), reverse=True)
        return docs[:limit]

    async def add_chunk(self, build_id: str, seq: int, text: str) -> None:
        """Insert one log chunk (idempotent by build and seq), then count it on the build."""
        try:
            await self.logs.insert_one(
                {
                    "_id": chunk_id(build_id, seq),
                    "build": build_id,
                    "seq": seq,
                    "text": text,
                    "at": utcnow(),
                }
            )
        except DuplicateKeyError:
            pass
        async with self._lock(build_id):
            # $max: a retried earlier chunk never moves the count back.
            await self.builds.update_one({"_id": build_id}, {"$max": {"log_seq": seq}})

    async def chunks(self, build_id: str, after: int, upto: int) -> list[tuple[int, str]]:
        """Chunks ``after < seq <= upto``, in order."""
        if upto <= after:
            return []
        ids = [chunk_id(build_id, s) for s in range(after + 1, upto + 1)]
        docs = await read_all(self.logs.find({"_id": {"$in": ids}}))
        return sorted((d["seq"], d["text"]) for d in docs)

    async def prune(self, older_than: timedelta) -> int:
        """Forget log chunks older than ``older_than`` (the build documents stay)."""
        res = await self.logs.delete_many({"at": {"$lt": utcnow() - older_than}})
        return res.deleted_count
