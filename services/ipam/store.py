"""IPAM persistence: the :class:`IpamStore` port and its MongoDB adapter.

The in-memory twin is :class:`services.ipam.fakes.MemoryIpamStore`; the contract test runs both.

Two facts about FerretDB v1 (SQLite) shape this module:

- ``find_one_and_update``, ``update_one`` and ``delete_one`` are not atomic across
  connections: each matches its filter, then writes (or deletes) by ``_id``, so two writers may
  both "win", and a conditional delete may remove a document that stopped matching in between.
  An insert under a unique index is the one arbiter; a stale lease is deleted only by the one
  delivery that inserted its ``lease_cleanups`` marker, and only by its ``claim_id`` (see
  ``Claims._delete_stale_claim`` in ``service/claims.py``).
- Only ``_id`` equality is served by an index; any other filter, range or sort reads the whole
  collection. So every call on the allocation path is an ``_id`` read or an insert; the
  queries that filter or sort (usage, lookups, leftovers) are off the hot path.

Collections:

- ``pools``: ``_id`` = name; ``uid`` and ``(dc, vlan_id)`` unique. Also hints (``block_hint``,
  ``free_head``, ``free_tail``, ``ready_head``, ``ready_tail``) that only save probing; nothing
  relies on them being exact.
- ``leases``: ``_id`` = machine_id (one lease per machine); ``active_ip`` is unique, so one IP
  never has two active leases. A released lease stays as a tombstone (``state: released``,
  ``active_ip: released:<machine>``), so a late duplicate ``ip.allocate`` of a destroyed
  machine is refused instead of leaking an address.
- ``ip_history``: ``_id`` = ``<ip>@<pool uid>#<gen>``, the gen-th allocation of that address
  in that pool, with its machine and times. Inserted when a released address is taken again
  (the insert is the claim), upserted at release.
- ``ip_free``: released addresses as a queue, ``_id`` = ``<pool uid>:<seq>``, contiguous
  sequence numbers, never deleted; an entry is consumed when ``ip_history`` has its next gen.
  Addresses of machines that never ran wait in a second queue, ``<pool uid>+ready:<seq>``,
  free at once (no cooldown).
- ``ip_blocks``: ``_id`` = ``<pool uid>:<k>``: block k of never-used offsets, claimed by one
  replica.
- ``lease_cleanups``: ``_id`` = ``<machine>/<claim>#<round>``: the delivery that may delete a
  stale claim; inserted once per stale claim (a later round only if a winner died), never
  deleted.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from pymongo import ASCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.db import ensure_indexes, read_all
from libs.common.errors import ConflictError, translate_errors

from .documents import (
    CleanupDoc,
    FreeSlotDoc,
    HintField,
    HistoryDoc,
    HistoryFields,
    LeaseDoc,
    PoolChanges,
    PoolDoc,
)

__all__ = [
    "ARCHIVE",
    "BLOCKS",
    "CLEANUPS",
    "FREE",
    "HISTORY",
    "INDEXES",
    "LEASES",
    "POOLS",
    "IpamStore",
    "LeaseConflict",
    "MongoIpamStore",
    "cleanup_id",
    "history_id",
    "slot_id",
]

POOLS, ARCHIVE, LEASES, HISTORY, FREE, BLOCKS, CLEANUPS = (
    "pools",
    "pools_deleted",
    "leases",
    "ip_history",
    "ip_free",
    "ip_blocks",
    "lease_cleanups",
)

INDEXES: dict[str, list[IndexModel]] = {
    POOLS: [
        IndexModel([("uid", ASCENDING)], unique=True),
        IndexModel([("dc", ASCENDING), ("vlan_id", ASCENDING)], unique=True),
    ],
    LEASES: [IndexModel([("active_ip", ASCENDING)], unique=True)],
}


def history_id(ip: str, pool_uid: str, gen: int) -> str:
    """The ``_id`` of the gen-th allocation of ``ip`` in a pool."""
    return f"{ip}@{pool_uid}#{gen}"


def cleanup_id(machine_id: str, claim: str, rnd: int) -> str:
    """The ``_id`` of the marker that elects round ``rnd``'s deleter of a stale claim."""
    return f"{machine_id}/{claim}#{rnd}"


def slot_id(pool_uid: str, seq: int) -> str:
    """The ``_id`` of entry ``seq`` of a pool's free queue."""
    return f"{pool_uid}:{seq}"


class LeaseConflict(ConflictError):
    """A unique key of the insert is taken (which one, FerretDB does not say)."""


class IpamStore(Protocol):
    """Port: the durable state of ipam."""

    async def setup(self) -> None:
        """Create the indexes."""
        ...

    # pools (small collection: filters are fine)
    async def insert_pool(self, doc: PoolDoc) -> None:
        """Insert a pool; :class:`LeaseConflict` if its name, uid or (dc, vlan) is taken."""
        ...

    async def get_pool(self, name: str) -> PoolDoc | None:
        """The pool named ``name``."""
        ...

    async def pool_by_vlan(self, dc: str, vlan_id: int) -> PoolDoc | None:
        """The pool of ``vlan_id`` in ``dc``."""
        ...

    async def list_pools(self, dc: str | None = None) -> list[PoolDoc]:
        """Every pool (of ``dc``), by name."""
        ...

    async def pools_containing(self, ip_int: int) -> list[PoolDoc]:
        """Pools, current and deleted, whose cidr holds ``ip_int``."""
        ...

    async def overlapping_pools(self, first: int, last: int, uid: str) -> list[PoolDoc]:
        """Other current pools sharing an address with ``[first, last]``."""
        ...

    async def update_pool(self, name: str, fields: PoolChanges) -> None:
        """Set ``fields`` on the pool."""
        ...

    async def raise_hint(self, name: str, field: HintField, value: int) -> None:
        """Raise a pool's hint counter to ``value`` (never lowers it on MongoDB)."""
        ...

    async def delete_pool(self, doc: PoolDoc) -> None:
        """Archive the pool (for lookups of its history) and drop its queues and blocks."""
        ...

    # leases (active)
    async def insert_lease(self, doc: LeaseDoc) -> None:
        """Insert an active lease; :class:`LeaseConflict` if the machine or the IP has one."""
        ...

    async def get_lease(self, machine_id: str) -> LeaseDoc | None:
        """The machine's active lease."""
        ...

    async def delete_lease(self, machine_id: str, ip: str, claim_id: str | None = None) -> bool:
        """Drop the machine's active lease of ``ip`` (of that claim, if named); False if none."""
        ...

    async def end_lease(self, machine_id: str, ip: str, at: datetime) -> None:
        """Turn the active lease into a tombstone: the IP is free, the machine stays known."""
        ...

    async def lease_of_ip(self, ip: str) -> LeaseDoc | None:
        """The active lease of ``ip`` (a filter: off the hot path)."""
        ...

    async def leases_of_pool(self, pool_uid: str) -> list[LeaseDoc]:
        """Active leases of a pool (a filter: off the hot path)."""
        ...

    async def leases_of_request(self, request_id: str) -> list[LeaseDoc]:
        """Active leases made for a bulk request (a filter: off the hot path)."""
        ...

    # history
    async def get_history(self, hid: str) -> HistoryDoc | None:
        """One history record."""
        ...

    async def insert_history(self, doc: HistoryDoc) -> None:
        """Insert a history record; :class:`LeaseConflict` if that gen is taken."""
        ...

    async def upsert_history(
        self, hid: str, fields: HistoryFields, on_insert: HistoryFields | None = None
    ) -> None:
        """Create or complete a history record (``on_insert`` only when creating it)."""
        ...

    async def delete_history(self, hid: str) -> None:
        """Forget a history record (rollback of an unannounced bulk allocation)."""
        ...

    async def history_of_machine(self, machine_id: str) -> HistoryDoc | None:
        """The machine's latest history record (a filter: off the hot path)."""
        ...

    async def released_since(self, pool_uid: str, since: datetime) -> int:
        """Releases in the pool after ``since`` that cool down (their machine ran; a filter:
        off the hot path)."""
        ...

    # free queue
    async def get_slot(self, sid: str) -> FreeSlotDoc | None:
        """One entry of a free queue."""
        ...

    async def insert_slot(self, doc: FreeSlotDoc) -> bool:
        """Append at ``doc['_id']``; False if that sequence number is taken."""
        ...

    # stale-claim cleanups
    async def claim_cleanup(self, doc: CleanupDoc) -> bool:
        """Insert a cleanup marker; False if that round has a winner already."""
        ...

    async def get_cleanup(self, cid: str) -> CleanupDoc | None:
        """One cleanup marker."""
        ...

    # blocks
    async def claim_block(self, pool_uid: str, k: int, owner: str, at: datetime) -> bool:
        """Claim block ``k``; False if another replica has it."""
        ...

    async def open_blocks(self, pool_uid: str) -> list[int]:
        """Claimed blocks not known to be used up (a filter: off the hot path)."""
        ...

    async def mark_block_full(self, pool_uid: str, k: int) -> None:
        """Record that every address of block ``k`` was handed out."""
        ...


class MongoIpamStore:
    """:class:`IpamStore` on the MongoDB API (FerretDB or MongoDB)."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._db = db
        self._pools, self._archive = db[POOLS], db[ARCHIVE]
        self._leases, self._history = db[LEASES], db[HISTORY]
        self._free, self._blocks = db[FREE], db[BLOCKS]
        self._cleanups = db[CLEANUPS]

    @translate_errors
    async def setup(self) -> None:
        """Create the indexes."""
        await ensure_indexes(self._db, INDEXES)

    @translate_errors
    async def insert_pool(self, doc: PoolDoc) -> None:
        """Insert a pool."""
        try:
            await self._pools.insert_one(dict(doc))
        except DuplicateKeyError as err:
            raise LeaseConflict(f"pool {doc['_id']} conflicts with an existing pool") from err

    @translate_errors
    async def get_pool(self, name: str) -> PoolDoc | None:
        """The pool named ``name``."""
        return await self._pools.find_one({"_id": name})

    @translate_errors
    async def pool_by_vlan(self, dc: str, vlan_id: int) -> PoolDoc | None:
        """The pool of ``vlan_id`` in ``dc``."""
        return await self._pools.find_one({"dc": dc, "vlan_id": vlan_id})

    @translate_errors
    async def list_pools(self, dc: str | None = None) -> list[PoolDoc]:
        """Every pool (of ``dc``), by name."""
        query = {} if dc is None else {"dc": dc}
        return await read_all(self._pools.find(query).sort("_id", ASCENDING))

    @translate_errors
    async def pools_containing(self, ip_int: int) -> list[PoolDoc]:
        """Pools, current and deleted, whose cidr holds ``ip_int``."""
        query = {"first": {"$lte": ip_int}, "last": {"$gte": ip_int}}
        return [
            *await read_all(self._pools.find(query)),
            *await read_all(self._archive.find(query)),
        ]

    @translate_errors
    async def overlapping_pools(self, first: int, last: int, uid: str) -> list[PoolDoc]:
        """Other current pools sharing an address with ``[first, last]``."""
        query = {"first": {"$lte": last}, "last": {"$gte": first}, "uid": {"$ne": uid}}
        return await read_all(self._pools.find(query))

    @translate_errors
    async def update_pool(self, name: str, fields: PoolChanges) -> None:
        """Set ``fields`` on the pool."""
        await self._pools.update_one({"_id": name}, {"$set": fields})

    @translate_errors
    async def raise_hint(self, name: str, field: HintField, value: int) -> None:
        """Raise a hint counter (a lost race only leaves it lower: it stays a valid hint)."""
        await self._pools.update_one({"_id": name}, {"$max": {field: value}})

    @translate_errors
    async def delete_pool(self, doc: PoolDoc) -> None:
        """Archive the pool and drop its queue and blocks (history is kept)."""
        uid = doc["uid"]
        await self._archive.update_one({"_id": uid}, {"$set": {**doc, "_id": uid}}, upsert=True)
        await self._free.delete_many({"pool_uid": uid})
        await self._blocks.delete_many({"pool_uid": uid})
        await self._pools.delete_one({"uid": uid})

    @translate_errors
    async def insert_lease(self, doc: LeaseDoc) -> None:
        """Insert an active lease."""
        try:
            await self._leases.insert_one(dict(doc))
        except DuplicateKeyError as err:
            raise LeaseConflict(f"{doc['_id']} or {doc['active_ip']} already leased") from err

    @translate_errors
    async def get_lease(self, machine_id: str) -> LeaseDoc | None:
        """The machine's active lease."""
        return await self._leases.find_one({"_id": machine_id})

    @translate_errors
    async def delete_lease(self, machine_id: str, ip: str, claim_id: str | None = None) -> bool:
        """Drop the machine's active lease of ``ip`` (of that claim, if named)."""
        match = {"_id": machine_id, "active_ip": ip}
        if claim_id is not None:
            match["claim_id"] = claim_id
        result = await self._leases.delete_one(match)
        return result.deleted_count == 1

    @translate_errors
    async def end_lease(self, machine_id: str, ip: str, at: datetime) -> None:
        """Turn the active lease into a tombstone."""
        await self._leases.update_one(
            {"_id": machine_id, "active_ip": ip},
            {
                "$set": {
                    "state": "released",
                    "released_at": at,
                    "active_ip": f"released:{machine_id}",
                }
            },
        )

    @translate_errors
    async def lease_of_ip(self, ip: str) -> LeaseDoc | None:
        """The active lease of ``ip``."""
        return await self._leases.find_one({"active_ip": ip})

    @translate_errors
    async def leases_of_pool(self, pool_uid: str) -> list[LeaseDoc]:
        """Active leases of a pool."""
        return await read_all(self._leases.find({"pool_uid": pool_uid, "state": "active"}))

    @translate_errors
    async def leases_of_request(self, request_id: str) -> list[LeaseDoc]:
        """Active leases made for a bulk request."""
        return await read_all(self._leases.find({"request_id": request_id, "state": "active"}))

    @translate_errors
    async def get_history(self, hid: str) -> HistoryDoc | None:
        """One history record."""
        return await self._history.find_one({"_id": hid})

    @translate_errors
    async def insert_history(self, doc: HistoryDoc) -> None:
        """Insert a history record; :class:`LeaseConflict` if that gen is taken."""
        try:
            await self._history.insert_one(dict(doc))
        except DuplicateKeyError as err:
            raise LeaseConflict(f"{doc['_id']} already taken") from err

    @translate_errors
    async def upsert_history(
        self, hid: str, fields: HistoryFields, on_insert: HistoryFields | None = None
    ) -> None:
        """Create or complete a history record (``on_insert`` only when creating it)."""
        change: dict = {"$set": fields}
        if on_insert:
            change["$setOnInsert"] = on_insert
        await self._history.update_one({"_id": hid}, change, upsert=True)

    @translate_errors
    async def delete_history(self, hid: str) -> None:
        """Forget a history record."""
        await self._history.delete_one({"_id": hid})

    @translate_errors
    async def history_of_machine(self, machine_id: str) -> HistoryDoc | None:
        """The machine's latest history record."""
        return await self._history.find_one({"machine_id": machine_id}, sort=[("allocated_at", -1)])

    @translate_errors
    async def released_since(self, pool_uid: str, since: datetime) -> int:
        """Releases in the pool after ``since`` that cool down (their machine ran)."""
        return await self._history.count_documents(
            {"pool_uid": pool_uid, "released_at": {"$gt": since}, "ever_ran": {"$ne": False}}
        )

    @translate_errors
    async def get_slot(self, sid: str) -> FreeSlotDoc | None:
        """One entry of a free queue."""
        return await self._free.find_one({"_id": sid})

    @translate_errors
    async def insert_slot(self, doc: FreeSlotDoc) -> bool:
        """Append at ``doc['_id']``; False if that sequence number is taken."""
        try:
            await self._free.insert_one(dict(doc))
        except DuplicateKeyError:
            return False
        return True

    @translate_errors
    async def claim_cleanup(self, doc: CleanupDoc) -> bool:
        """Insert a cleanup marker; False if that round has a winner already."""
        try:
            await self._cleanups.insert_one(dict(doc))
        except DuplicateKeyError:
            return False
        return True

    @translate_errors
    async def get_cleanup(self, cid: str) -> CleanupDoc | None:
        """One cleanup marker."""
        return await self._cleanups.find_one({"_id": cid})

    @translate_errors
    async def claim_block(self, pool_uid: str, k: int, owner: str, at: datetime) -> bool:
        """Claim block ``k``; False if another replica has it."""
        doc = {
            "_id": f"{pool_uid}:{k}",
            "pool_uid": pool_uid,
            "k": k,
            "owner": owner,
            "at": at,
            "full": False,
        }
        try:
            await self._blocks.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    @translate_errors
    async def open_blocks(self, pool_uid: str) -> list[int]:
        """Claimed blocks not known to be used up."""
        docs = await read_all(self._blocks.find({"pool_uid": pool_uid, "full": False}, {"k": 1}))
        return sorted(d["k"] for d in docs)

    @translate_errors
    async def mark_block_full(self, pool_uid: str, k: int) -> None:
        """Record that every address of block ``k`` was handed out."""
        await self._blocks.update_one({"_id": f"{pool_uid}:{k}"}, {"$set": {"full": True}})
