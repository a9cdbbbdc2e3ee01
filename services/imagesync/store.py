"""imagesync's MongoDB state: sync_jobs, seen_events, the last known digest of each tag, and
which repositories hold which blob (for cross-repository mounts).

Only the MongoDB subset FerretDB v1 serves: CRUD, ``find_one_and_update``, unique indexes.
A job's claim is a conditional ``find_one_and_update`` (pending/failed, or running with an
expired lease → running). On MongoDB that makes one replica the job's runner; FerretDB v1
matches the filter and writes in two steps, so two replicas claiming at the same moment can
both run the job. A sync is idempotent (the target ends with the same manifest and blobs), so
that costs a second copy, never a wrong result. FerretDB v1 also applies ``$addToSet`` as a
read then a write, so the blob index keeps one document per holder instead of an array.
Every read that may span several batches is read in one (``read_all``): an open FerretDB cursor
holds one of its SQLite connections until it is exhausted or killed.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.clock import utcnow
from libs.common.contracts.imagesync import SyncJobView
from libs.common.db import ensure_indexes, read_all

from .domain import SyncOrder, SyncStats, add_to_history, job_id

__all__ = ["JOBS", "SEEN", "MongoBlobIndex", "SyncStore"]

JOBS = "sync_jobs"
SEEN = "seen_events"
TAGS = "sync_tags"
BLOB_HOLDERS = "sync_blob_holders"

INDEXES = {
    JOBS: [
        IndexModel(
            [
                ("source", ASCENDING),
                ("target", ASCENDING),
                ("repo", ASCENDING),
                ("tag", ASCENDING),
                ("digest", ASCENDING),
            ],
            unique=True,
            name="natural_key",
        ),
        IndexModel([("updated_at", DESCENDING)], name="recent"),
        IndexModel([("state", ASCENDING), ("updated_at", DESCENDING)], name="by_state"),
    ],
    SEEN: [IndexModel([("at", ASCENDING)], name="at")],
    TAGS: [],
    BLOB_HOLDERS: [IndexModel([("dc", ASCENDING), ("digest", ASCENDING)], name="blob")],
}


class SyncStore:
    """sync_jobs, seen_events and the tag digests, on one database."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._db = db
        self._jobs = db[JOBS]
        self._seen = db[SEEN]
        self._tags = db[TAGS]

    async def setup(self) -> None:
        """Create the indexes (idempotent)."""
        await ensure_indexes(self._db, INDEXES)

    # --- seen_events --------------------------------------------------------------------

    async def record_event(self, dc: str, event_id: str, detail: dict[str, Any]) -> bool:
        """Record a notification under its dedupe key; False when recorded and published.

        The insert under the unique ``_id`` is the arbiter: two replicas reporting one push at
        the same moment both try it, and FerretDB lets exactly one land.
        """
        try:
            await self._seen.insert_one(
                {"_id": event_id, "dc": dc, "published": False, "at": utcnow(), **detail}
            )
            return True
        except DuplicateKeyError:
            doc = await self._seen.find_one({"_id": event_id})
            # A record whose publish failed is handed out again, so the registry's retry works.
            return doc is not None and not doc.get("published", False)

    async def event_published(self, event_id: str) -> None:
        """Mark the event's ``image.pushed`` as sent."""
        await self._seen.update_one({"_id": event_id}, {"$set": {"published": True}})

    async def forget_event(self, event_id: str) -> None:
        """Drop a record whose publish failed (the registry will send it again)."""
        await self._seen.delete_one({"_id": event_id, "published": False})

    # --- jobs ---------------------------------------------------------------------------

    async def claim(self, order: SyncOrder, reason: str, lease_s: float) -> dict[str, Any] | None:
        """Create or take the job of ``order`` to run it, counting its first attempt.

        None when the job is finished (done, superseded) or another worker holds a live
        lease. One upsert does it: the filter matches only a claimable job, so an existing
        unclaimable one makes the upsert collide on ``_id``.
        """
        jid = job_id(order.source, order.target, order.repo, order.tag, order.digest)
        now = utcnow()
        try:
            return await self._jobs.find_one_and_update(
                {
                    "_id": jid,
                    "$or": [
                        {"state": {"$in": ["pending", "failed"]}},
                        {"state": "running", "lease_until": {"$lt": now}},
                    ],
                },
                {
                    "$set": {
                        "state": "running",
                        "lease_until": now + timedelta(seconds=lease_s),
                        "updated_at": now,
                        "error": None,
                    },
                    "$setOnInsert": {
                        "source": order.source,
                        "target": order.target,
                        "repo": order.repo,
                        "tag": order.tag,
                        "digest": order.digest,
                        "bytes_copied": 0,
                        "blobs_copied": 0,
                        "blobs_skipped": 0,
                        "blobs_mounted": 0,
                        "reason": reason,
                        "created_at": now,
                        "finished_at": None,
                    },
                    "$inc": {"attempts": 1},
                },
                upsert=True,
                return_document=ReturnDocument.AFTER,
            )
        except DuplicateKeyError:
            return None

    async def attempt(self, jid: str, lease_s: float) -> None:
        """Count one attempt and extend the lease."""
        now = utcnow()
        await self._jobs.update_one(
            {"_id": jid},
            {
                "$inc": {"attempts": 1},
                "$set": {"updated_at": now, "lease_until": now + timedelta(seconds=lease_s)},
            },
        )

    async def renew(self, jid: str, lease_s: float) -> None:
        """Extend the lease of a job this worker runs."""
        now = utcnow()
        await self._jobs.update_one(
            {"_id": jid, "state": "running"},
            {"$set": {"lease_until": now + timedelta(seconds=lease_s), "updated_at": now}},
        )

    async def release(self, jid: str, stats: SyncStats) -> None:
        """Give an interrupted job back (pending, no lease), keeping what it moved."""
        await self._jobs.update_one(
            {"_id": jid, "state": "running"},
            {
                "$set": {"state": "pending", "lease_until": None, "updated_at": utcnow()},
                "$inc": stats.as_doc(),
            },
        )

    async def finish(
        self, jid: str, state: str, stats: SyncStats, error: str | None = None
    ) -> dict[str, Any] | None:
        """Close the job as ``state`` (done, failed, superseded) with what it moved."""
        now = utcnow()
        return await self._jobs.find_one_and_update(
            {"_id": jid},
            {
                "$set": {
                    "state": state,
                    "error": error,
                    "updated_at": now,
                    "finished_at": now,
                    "lease_until": None,
                },
                "$inc": stats.as_doc(),
            },
            return_document=ReturnDocument.AFTER,
        )

    async def get_job(self, jid: str) -> dict[str, Any] | None:
        """One job by id."""
        return await self._jobs.find_one({"_id": jid})

    async def list_jobs(
        self,
        *,
        state: str | None = None,
        repo: str | None = None,
        target: str | None = None,
        limit: int = 100,
    ) -> list[SyncJobView]:
        """Most recently updated jobs first."""
        query: dict[str, Any] = {}
        if state:
            query["state"] = state
        if repo:
            query["repo"] = repo
        if target:
            query["target"] = target
        docs = await read_all(self._jobs.find(query).sort("updated_at", DESCENDING).limit(limit))
        return [SyncJobView(id=d["_id"], **d) for d in docs]

    async def prune(self, older_than: timedelta) -> int:
        """Forget seen events and finished jobs older than ``older_than``; return how many."""
        cutoff = utcnow() - older_than
        seen = await self._seen.delete_many({"at": {"$lt": cutoff}})
        jobs = await self._jobs.delete_many(
            {"state": {"$in": ["done", "superseded", "failed"]}, "updated_at": {"$lt": cutoff}}
        )
        return seen.deleted_count + jobs.deleted_count

    # --- tag digests --------------------------------------------------------------------

    async def remember_tag(self, repo: str, tag: str, digest: str, dc: str) -> None:
        """``repo:tag`` was just seen pushed or replicated at ``digest``."""
        key = f"{repo}:{tag}"
        doc = await self._tags.find_one({"_id": key})
        history = add_to_history(doc.get("history", []) if doc else [], digest)
        await self._tags.update_one(
            {"_id": key},
            {"$set": {"repo": repo, "tag": tag, "history": history, "dc": dc, "at": utcnow()}},
            upsert=True,
        )

    async def tag_history(self) -> dict[tuple[str, str], list[str]]:
        """The digests each tag was seen at, oldest first."""
        docs = await read_all(self._tags.find({}))
        return {(d["repo"], d["tag"]): d.get("history", []) for d in docs}


class MongoBlobIndex:
    """:class:`~services.imagesync.ports.BlobIndex` on the ``sync_blob_holders`` collection.

    One document per (dc, blob, repository) under a unique ``_id``, because FerretDB v1 applies
    ``$addToSet`` as a read then a write: concurrent adds to one array lose holders, while
    concurrent inserts of distinct ``_id`` s all land.
    """

    def __init__(self, db: AsyncDatabase) -> None:
        self._coll = db[BLOB_HOLDERS]

    async def where(self, dc: str, digest: str) -> list[str]:
        """Repositories of ``dc`` known to hold ``digest``."""
        docs = await read_all(self._coll.find({"dc": dc, "digest": digest}, {"repo": 1}))
        return sorted(doc["repo"] for doc in docs)

    async def add(self, dc: str, digest: str, repo: str) -> None:
        """Remember that ``repo`` holds ``digest``."""
        try:
            await self._coll.insert_one(
                {"_id": f"{dc}|{digest}|{repo}", "dc": dc, "digest": digest, "repo": repo}
            )
        except DuplicateKeyError:
            pass  # known already: a holder is a fact, recording it twice changes nothing
