"""IPAM persistence: the :class:`IpamStore` port, its MongoDB adapter and an in-memory fake.

Every claim is arbitrated by a unique index, never by a read-then-write: FerretDB v1 does not
make ``find_one_and_update`` atomic across connections, so two writers may both "win" it.

Collections (all keyed so that an insert is the claim):

- ``pools``: ``_id`` = name; unique ``uid``; unique ``(dc, vlan_id)``.
- ``leases``: one record per allocation, kept after release as the IP's history.
  ``_id`` = ``<pool uid>:<ip>#<gen>`` (the gen-th allocation of that address can happen once);
  ``active_ip`` (= ip while active) and ``machine_key`` (= machine_id while active) are unique,
  so one IP never has two active leases and one machine never holds two. On release both are
  set to ``released:<_id>``.
- ``ip_free``: released addresses, ``_id`` = the released lease's ``_id``, ordered by
  ``released_at`` (cooldown is applied when reading, so a changed cooldown applies at once).
- ``ip_blocks``: ``_id`` = ``<pool uid>:<k>``: block k of never-used offsets claimed by one
  replica; ``full`` once every address in it was tried.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Protocol

from pymongo import ASCENDING, DESCENDING, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.db import ensure_indexes
from libs.common.errors import ConflictError, translate_errors

__all__ = ["INDEXES", "IpamStore", "LeaseConflict", "MemoryIpamStore", "MongoIpamStore"]

POOLS, LEASES, FREE, BLOCKS = "pools", "leases", "ip_free", "ip_blocks"

INDEXES: dict[str, list[IndexModel]] = {
    POOLS: [
        IndexModel([("uid", ASCENDING)], unique=True),
        IndexModel([("dc", ASCENDING), ("vlan_id", ASCENDING)], unique=True),
    ],
    LEASES: [
        IndexModel([("active_ip", ASCENDING)], unique=True),
        IndexModel([("machine_key", ASCENDING)], unique=True),
        IndexModel([("pool_uid", ASCENDING), ("ip_int", ASCENDING), ("gen", DESCENDING)]),
        IndexModel([("pool_uid", ASCENDING), ("state", ASCENDING), ("released_at", ASCENDING)]),
        IndexModel([("ip", ASCENDING), ("allocated_at", ASCENDING)]),
        IndexModel([("machine_id", ASCENDING), ("allocated_at", DESCENDING)]),
        IndexModel([("request_id", ASCENDING)]),
    ],
    FREE: [IndexModel([("pool_uid", ASCENDING), ("released_at", ASCENDING)])],
    BLOCKS: [
        IndexModel([("pool_uid", ASCENDING), ("k", DESCENDING)]),
        IndexModel([("pool_uid", ASCENDING), ("full", ASCENDING)]),
    ],
}


class LeaseConflict(ConflictError):
    """A unique key of the insert is taken (which one, FerretDB does not say)."""


class IpamStore(Protocol):
    """Port: the durable state of ipam. Every method is one round trip."""

    async def setup(self) -> None:
        """Create the indexes."""
        ...

    # pools
    async def insert_pool(self, doc: dict) -> None:
        """Insert a pool; :class:`LeaseConflict` if its name, uid or (dc, vlan) is taken."""
        ...

    async def get_pool(self, name: str) -> dict | None:
        """The pool named ``name``."""
        ...

    async def pool_by_vlan(self, dc: str, vlan_id: int) -> dict | None:
        """The pool of ``vlan_id`` in ``dc``."""
        ...

    async def list_pools(self, dc: str | None = None) -> list[dict]:
        """Every pool (of ``dc``), by name."""
        ...

    async def overlapping_pools(self, first: int, last: int, uid: str) -> list[dict]:
        """Other pools sharing an address with ``[first, last]``."""
        ...

    async def update_pool(self, name: str, fields: dict) -> None:
        """Set ``fields`` on the pool."""
        ...

    async def delete_pool(self, uid: str) -> None:
        """Delete the pool, its free list and its blocks (lease history is kept)."""
        ...

    # leases
    async def insert_lease(self, doc: dict) -> None:
        """Insert a lease; :class:`LeaseConflict` if any unique key is taken."""
        ...

    async def get_lease(self, lease_id: str) -> dict | None:
        """One lease record by id."""
        ...

    async def active_lease_of_machine(self, machine_id: str) -> dict | None:
        """The machine's active lease."""
        ...

    async def last_lease_of_machine(self, machine_id: str) -> dict | None:
        """The machine's most recent lease, active or released."""
        ...

    async def latest_lease_of_ip(self, pool_uid: str, ip_int: int) -> dict | None:
        """The highest-gen lease of an address in a pool."""
        ...

    async def leases_of_ip(self, ip: str) -> list[dict]:
        """Every lease ever of ``ip`` (any pool), oldest first."""
        ...

    async def leased_in_range(self, pool_uid: str, lo: int, hi: int) -> set[int]:
        """Addresses in ``[lo, hi]`` that ever had a lease in the pool."""
        ...

    async def active_in_range(self, pool_uid: str, lo: int, hi: int) -> list[dict]:
        """Active leases in ``[lo, hi]``."""
        ...

    async def mark_released(self, lease_id: str, at: datetime) -> bool:
        """Turn an active lease into history; False if it was not active."""
        ...

    async def delete_lease(self, lease_id: str) -> None:
        """Forget a lease that was never announced (rollback of a bulk request)."""
        ...

    async def leases_of_request(self, request_id: str) -> list[dict]:
        """Active leases made for a bulk request."""
        ...

    async def count_active(self, pool_uid: str) -> int:
        """Active leases in the pool."""
        ...

    async def count_cooling(self, pool_uid: str, cutoff: datetime) -> int:
        """Released leases whose release is after ``cutoff`` (still cooling)."""
        ...

    # free list
    async def add_free(self, doc: dict) -> None:
        """Put a released address on the free list (a duplicate is ignored)."""
        ...

    async def free_candidates(self, pool_uid: str, cutoff: datetime, limit: int) -> list[dict]:
        """The least recently released addresses released at or before ``cutoff``."""
        ...

    async def delete_free(self, free_id: str) -> None:
        """Drop one free-list entry."""
        ...

    async def delete_free_in_range(self, pool_uid: str, lo: int, hi: int) -> None:
        """Drop the free-list entries of ``[lo, hi]``."""
        ...

    # blocks of never-used offsets
    async def max_block(self, pool_uid: str) -> int | None:
        """The highest claimed block number."""
        ...

    async def claim_block(self, pool_uid: str, k: int, owner: str, at: datetime) -> bool:
        """Claim block ``k``; False if another replica has it."""
        ...

    async def open_blocks(self, pool_uid: str) -> list[int]:
        """Claimed blocks not yet known to be used up."""
        ...

    async def mark_block_full(self, pool_uid: str, k: int) -> None:
        """Record that every address of block ``k`` was tried."""
        ...


def _released_key(lease_id: str) -> str:
    return f"released:{lease_id}"


class MongoIpamStore:
    """:class:`IpamStore` on the MongoDB API (FerretDB or MongoDB)."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._db = db
        self._pools = db[POOLS]
        self._leases = db[LEASES]
        self._free = db[FREE]
        self._blocks = db[BLOCKS]

    @translate_errors
    async def setup(self) -> None:
        """Create the indexes."""
        await ensure_indexes(self._db, INDEXES)

    @translate_errors
    async def insert_pool(self, doc: dict) -> None:
        """Insert a pool; :class:`LeaseConflict` if a unique key is taken."""
        try:
            await self._pools.insert_one(dict(doc))
        except DuplicateKeyError as err:
            raise LeaseConflict(f"pool {doc['_id']} conflicts with an existing pool") from err

    @translate_errors
    async def get_pool(self, name: str) -> dict | None:
        """The pool named ``name``."""
        return await self._pools.find_one({"_id": name})

    @translate_errors
    async def pool_by_vlan(self, dc: str, vlan_id: int) -> dict | None:
        """The pool of ``vlan_id`` in ``dc``."""
        return await self._pools.find_one({"dc": dc, "vlan_id": vlan_id})

    @translate_errors
    async def list_pools(self, dc: str | None = None) -> list[dict]:
        """Every pool (of ``dc``), by name."""
        query = {} if dc is None else {"dc": dc}
        return await self._pools.find(query).sort("_id", ASCENDING).to_list()

    @translate_errors
    async def overlapping_pools(self, first: int, last: int, uid: str) -> list[dict]:
        """Other pools sharing an address with ``[first, last]``."""
        query = {"first": {"$lte": last}, "last": {"$gte": first}, "uid": {"$ne": uid}}
        return await self._pools.find(query).to_list()

    @translate_errors
    async def update_pool(self, name: str, fields: dict) -> None:
        """Set ``fields`` on the pool."""
        await self._pools.update_one({"_id": name}, {"$set": fields})

    @translate_errors
    async def delete_pool(self, uid: str) -> None:
        """Delete the pool, its free list and its blocks (lease history is kept)."""
        await self._free.delete_many({"pool_uid": uid})
        await self._blocks.delete_many({"pool_uid": uid})
        await self._pools.delete_one({"uid": uid})

    @translate_errors
    async def insert_lease(self, doc: dict) -> None:
        """Insert a lease; :class:`LeaseConflict` if any unique key is taken."""
        try:
            await self._leases.insert_one(dict(doc))
        except DuplicateKeyError as err:
            raise LeaseConflict(f"lease {doc['_id']} conflicts") from err

    @translate_errors
    async def get_lease(self, lease_id: str) -> dict | None:
        """One lease record by id."""
        return await self._leases.find_one({"_id": lease_id})

    @translate_errors
    async def active_lease_of_machine(self, machine_id: str) -> dict | None:
        """The machine's active lease."""
        return await self._leases.find_one({"machine_key": machine_id})

    @translate_errors
    async def last_lease_of_machine(self, machine_id: str) -> dict | None:
        """The machine's most recent lease."""
        return await self._leases.find_one(
            {"machine_id": machine_id}, sort=[("allocated_at", DESCENDING)]
        )

    @translate_errors
    async def latest_lease_of_ip(self, pool_uid: str, ip_int: int) -> dict | None:
        """The highest-gen lease of an address in a pool."""
        return await self._leases.find_one(
            {"pool_uid": pool_uid, "ip_int": ip_int}, sort=[("gen", DESCENDING)]
        )

    @translate_errors
    async def leases_of_ip(self, ip: str) -> list[dict]:
        """Every lease ever of ``ip``, oldest first."""
        return await self._leases.find({"ip": ip}).sort("allocated_at", ASCENDING).to_list()

    @translate_errors
    async def leased_in_range(self, pool_uid: str, lo: int, hi: int) -> set[int]:
        """Addresses in ``[lo, hi]`` that ever had a lease in the pool."""
        cursor = self._leases.find(
            {"pool_uid": pool_uid, "ip_int": {"$gte": lo, "$lte": hi}}, {"ip_int": 1}
        )
        return {d["ip_int"] async for d in cursor}

    @translate_errors
    async def active_in_range(self, pool_uid: str, lo: int, hi: int) -> list[dict]:
        """Active leases in ``[lo, hi]``."""
        query = {"pool_uid": pool_uid, "state": "active", "ip_int": {"$gte": lo, "$lte": hi}}
        return await self._leases.find(query).to_list()

    @translate_errors
    async def mark_released(self, lease_id: str, at: datetime) -> bool:
        """Turn an active lease into history; False if it was not active."""
        key = _released_key(lease_id)
        result = await self._leases.update_one(
            {"_id": lease_id, "state": "active"},
            {"$set": {"state": "released", "released_at": at, "active_ip": key,
                      "machine_key": key}},
        )
        return result.modified_count == 1

    @translate_errors
    async def delete_lease(self, lease_id: str) -> None:
        """Forget a lease that was never announced."""
        await self._leases.delete_one({"_id": lease_id})

    @translate_errors
    async def leases_of_request(self, request_id: str) -> list[dict]:
        """Active leases made for a bulk request."""
        return await self._leases.find({"request_id": request_id, "state": "active"}).to_list()

    @translate_errors
    async def count_active(self, pool_uid: str) -> int:
        """Active leases in the pool."""
        return await self._leases.count_documents({"pool_uid": pool_uid, "state": "active"})

    @translate_errors
    async def count_cooling(self, pool_uid: str, cutoff: datetime) -> int:
        """Released leases still cooling."""
        return await self._leases.count_documents(
            {"pool_uid": pool_uid, "state": "released", "released_at": {"$gt": cutoff}}
        )

    @translate_errors
    async def add_free(self, doc: dict) -> None:
        """Put a released address on the free list (a duplicate is ignored)."""
        try:
            await self._free.insert_one(dict(doc))
        except DuplicateKeyError:
            pass

    @translate_errors
    async def free_candidates(self, pool_uid: str, cutoff: datetime, limit: int) -> list[dict]:
        """The least recently released addresses released at or before ``cutoff``."""
        cursor = (
            self._free.find({"pool_uid": pool_uid, "released_at": {"$lte": cutoff}})
            .sort("released_at", ASCENDING)
            .limit(limit)
        )
        return await cursor.to_list()

    @translate_errors
    async def delete_free(self, free_id: str) -> None:
        """Drop one free-list entry."""
        await self._free.delete_one({"_id": free_id})

    @translate_errors
    async def delete_free_in_range(self, pool_uid: str, lo: int, hi: int) -> None:
        """Drop the free-list entries of ``[lo, hi]``."""
        await self._free.delete_many({"pool_uid": pool_uid, "ip_int": {"$gte": lo, "$lte": hi}})

    @translate_errors
    async def max_block(self, pool_uid: str) -> int | None:
        """The highest claimed block number."""
        doc = await self._blocks.find_one({"pool_uid": pool_uid}, sort=[("k", DESCENDING)])
        return None if doc is None else doc["k"]

    @translate_errors
    async def claim_block(self, pool_uid: str, k: int, owner: str, at: datetime) -> bool:
        """Claim block ``k``; False if another replica has it."""
        doc = {"_id": f"{pool_uid}:{k}", "pool_uid": pool_uid, "k": k, "owner": owner,
               "at": at, "full": False}
        try:
            await self._blocks.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    @translate_errors
    async def open_blocks(self, pool_uid: str) -> list[int]:
        """Claimed blocks not yet known to be used up."""
        cursor = self._blocks.find({"pool_uid": pool_uid, "full": False}, {"k": 1})
        return sorted([d["k"] async for d in cursor])

    @translate_errors
    async def mark_block_full(self, pool_uid: str, k: int) -> None:
        """Record that every address of block ``k`` was tried."""
        await self._blocks.update_one({"_id": f"{pool_uid}:{k}"}, {"$set": {"full": True}})


class MemoryIpamStore:
    """In-memory :class:`IpamStore` with the same unique keys, for unit tests."""

    _UNIQUE = {POOLS: (("uid",), ("dc", "vlan_id")), LEASES: (("active_ip",), ("machine_key",))}

    def __init__(self) -> None:
        self.colls: dict[str, dict[Any, dict]] = {POOLS: {}, LEASES: {}, FREE: {}, BLOCKS: {}}

    def _insert(self, coll: str, doc: dict) -> None:
        docs = self.colls[coll]
        if doc["_id"] in docs:
            raise LeaseConflict(f"duplicate _id {doc['_id']}")
        for fields in self._UNIQUE.get(coll, ()):
            key = tuple(doc.get(f) for f in fields)
            if any(tuple(d.get(f) for f in fields) == key for d in docs.values()):
                raise LeaseConflict(f"duplicate {fields}={key}")
        docs[doc["_id"]] = copy.deepcopy(doc)

    def _find(self, coll: str, pred) -> list[dict]:
        return [copy.deepcopy(d) for d in self.colls[coll].values() if pred(d)]

    @staticmethod
    def _first(docs: Iterable[dict], key, reverse: bool = False) -> dict | None:
        ordered = sorted(docs, key=key, reverse=reverse)
        return ordered[0] if ordered else None

    async def setup(self) -> None:
        """Nothing to create."""

    async def insert_pool(self, doc: dict) -> None:
        """Insert a pool."""
        self._insert(POOLS, doc)

    async def get_pool(self, name: str) -> dict | None:
        """The pool named ``name``."""
        return copy.deepcopy(self.colls[POOLS].get(name))

    async def pool_by_vlan(self, dc: str, vlan_id: int) -> dict | None:
        """The pool of ``vlan_id`` in ``dc``."""
        found = self._find(POOLS, lambda d: d["dc"] == dc and d["vlan_id"] == vlan_id)
        return found[0] if found else None

    async def list_pools(self, dc: str | None = None) -> list[dict]:
        """Every pool (of ``dc``), by name."""
        found = self._find(POOLS, lambda d: dc is None or d["dc"] == dc)
        return sorted(found, key=lambda d: d["_id"])

    async def overlapping_pools(self, first: int, last: int, uid: str) -> list[dict]:
        """Other pools sharing an address with ``[first, last]``."""
        return self._find(
            POOLS, lambda d: d["first"] <= last and d["last"] >= first and d["uid"] != uid
        )

    async def update_pool(self, name: str, fields: dict) -> None:
        """Set ``fields`` on the pool."""
        if name in self.colls[POOLS]:
            self.colls[POOLS][name].update(copy.deepcopy(fields))

    async def delete_pool(self, uid: str) -> None:
        """Delete the pool, its free list and its blocks."""
        for coll in (FREE, BLOCKS):
            for k in [k for k, d in self.colls[coll].items() if d["pool_uid"] == uid]:
                del self.colls[coll][k]
        for k in [k for k, d in self.colls[POOLS].items() if d["uid"] == uid]:
            del self.colls[POOLS][k]

    async def insert_lease(self, doc: dict) -> None:
        """Insert a lease."""
        self._insert(LEASES, doc)

    async def get_lease(self, lease_id: str) -> dict | None:
        """One lease record by id."""
        return copy.deepcopy(self.colls[LEASES].get(lease_id))

    async def active_lease_of_machine(self, machine_id: str) -> dict | None:
        """The machine's active lease."""
        found = self._find(LEASES, lambda d: d["machine_key"] == machine_id)
        return found[0] if found else None

    async def last_lease_of_machine(self, machine_id: str) -> dict | None:
        """The machine's most recent lease."""
        found = self._find(LEASES, lambda d: d["machine_id"] == machine_id)
        return self._first(found, key=lambda d: d["allocated_at"], reverse=True)

    async def latest_lease_of_ip(self, pool_uid: str, ip_int: int) -> dict | None:
        """The highest-gen lease of an address in a pool."""
        found = self._find(LEASES, lambda d: d["pool_uid"] == pool_uid and d["ip_int"] == ip_int)
        return self._first(found, key=lambda d: d["gen"], reverse=True)

    async def leases_of_ip(self, ip: str) -> list[dict]:
        """Every lease ever of ``ip``, oldest first."""
        return sorted(self._find(LEASES, lambda d: d["ip"] == ip), key=lambda d: d["allocated_at"])

    async def leased_in_range(self, pool_uid: str, lo: int, hi: int) -> set[int]:
        """Addresses in ``[lo, hi]`` that ever had a lease."""
        return {
            d["ip_int"]
            for d in self._find(
                LEASES, lambda d: d["pool_uid"] == pool_uid and lo <= d["ip_int"] <= hi
            )
        }

    async def active_in_range(self, pool_uid: str, lo: int, hi: int) -> list[dict]:
        """Active leases in ``[lo, hi]``."""
        return self._find(
            LEASES,
            lambda d: d["pool_uid"] == pool_uid and d["state"] == "active"
            and lo <= d["ip_int"] <= hi,
        )

    async def mark_released(self, lease_id: str, at: datetime) -> bool:
        """Turn an active lease into history."""
        doc = self.colls[LEASES].get(lease_id)
        if doc is None or doc["state"] != "active":
            return False
        key = _released_key(lease_id)
        doc.update(state="released", released_at=at, active_ip=key, machine_key=key)
        return True

    async def delete_lease(self, lease_id: str) -> None:
        """Forget a lease."""
        self.colls[LEASES].pop(lease_id, None)

    async def leases_of_request(self, request_id: str) -> list[dict]:
        """Active leases made for a bulk request."""
        return self._find(
            LEASES, lambda d: d.get("request_id") == request_id and d["state"] == "active"
        )

    async def count_active(self, pool_uid: str) -> int:
        """Active leases in the pool."""
        return len(
            self._find(LEASES, lambda d: d["pool_uid"] == pool_uid and d["state"] == "active")
        )

    async def count_cooling(self, pool_uid: str, cutoff: datetime) -> int:
        """Released leases still cooling."""
        return len(
            self._find(
                LEASES,
                lambda d: d["pool_uid"] == pool_uid and d["state"] == "released"
                and d["released_at"] > cutoff,
            )
        )

    async def add_free(self, doc: dict) -> None:
        """Put a released address on the free list."""
        self.colls[FREE].setdefault(doc["_id"], copy.deepcopy(doc))

    async def free_candidates(self, pool_uid: str, cutoff: datetime, limit: int) -> list[dict]:
        """The least recently released addresses released at or before ``cutoff``."""
        found = self._find(
            FREE, lambda d: d["pool_uid"] == pool_uid and d["released_at"] <= cutoff
        )
        return sorted(found, key=lambda d: d["released_at"])[:limit]

    async def delete_free(self, free_id: str) -> None:
        """Drop one free-list entry."""
        self.colls[FREE].pop(free_id, None)

    async def delete_free_in_range(self, pool_uid: str, lo: int, hi: int) -> None:
        """Drop the free-list entries of ``[lo, hi]``."""
        for k in [
            k for k, d in self.colls[FREE].items()
            if d["pool_uid"] == pool_uid and lo <= d["ip_int"] <= hi
        ]:
            del self.colls[FREE][k]

    async def max_block(self, pool_uid: str) -> int | None:
        """The highest claimed block number."""
        ks = [d["k"] for d in self.colls[BLOCKS].values() if d["pool_uid"] == pool_uid]
        return max(ks) if ks else None

    async def claim_block(self, pool_uid: str, k: int, owner: str, at: datetime) -> bool:
        """Claim block ``k``."""
        key = f"{pool_uid}:{k}"
        if key in self.colls[BLOCKS]:
            return False
        self.colls[BLOCKS][key] = {
            "_id": key, "pool_uid": pool_uid, "k": k, "owner": owner, "at": at, "full": False
        }
        return True

    async def open_blocks(self, pool_uid: str) -> list[int]:
        """Claimed blocks not yet known to be used up."""
        return sorted(
            d["k"] for d in self.colls[BLOCKS].values()
            if d["pool_uid"] == pool_uid and not d["full"]
        )

    async def mark_block_full(self, pool_uid: str, k: int) -> None:
        """Record that block ``k`` is used up."""
        doc = self.colls[BLOCKS].get(f"{pool_uid}:{k}")
        if doc is not None:
            doc["full"] = True
