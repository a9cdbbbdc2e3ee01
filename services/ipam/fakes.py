"""In-memory fakes of ipam's ports, for unit tests of the use cases.

:class:`MemoryIpamStore` keeps the real store's unique keys (a duplicate raises
:class:`LeaseConflict` as the MongoDB adapter does) and hands out copies, so a caller can no more
change a stored document in place than it can on a database. Unlike FerretDB v1 every call is
atomic; tests that need interleavings subclass it. tests/integration/test_ipam_store.py runs the
same contract against it and :class:`MongoIpamStore`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

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
from .store import ARCHIVE, BLOCKS, CLEANUPS, FREE, HISTORY, LEASES, POOLS, LeaseConflict

__all__ = ["MemoryIpamStore"]


class MemoryIpamStore:
    """In-memory :class:`IpamStore` with the same unique keys, for unit tests."""

    def __init__(self) -> None:
        self.c: dict[str, dict[Any, dict]] = {
            n: {} for n in (POOLS, ARCHIVE, LEASES, HISTORY, FREE, BLOCKS, CLEANUPS)
        }

    def _insert(
        self, coll: str, doc: Mapping[str, Any], unique: tuple[tuple[str, ...], ...] = ()
    ) -> None:
        docs = self.c[coll]
        if doc["_id"] in docs:
            raise LeaseConflict(f"duplicate _id {doc['_id']}")
        for fields in unique:
            key = tuple(doc.get(f) for f in fields)
            if any(tuple(d.get(f) for f in fields) == key for d in docs.values()):
                raise LeaseConflict(f"duplicate {fields}={key}")
        docs[doc["_id"]] = copy.deepcopy(doc)

    def _find(self, coll: str, pred: Callable[[dict], bool]) -> list[Any]:
        return [copy.deepcopy(d) for d in self.c[coll].values() if pred(d)]

    def _get(self, coll: str, key: str) -> Any:
        return copy.deepcopy(self.c[coll].get(key))

    async def setup(self) -> None:
        """Nothing to create."""

    async def insert_pool(self, doc: PoolDoc) -> None:
        """Insert a pool."""
        self._insert(POOLS, doc, (("uid",), ("dc", "vlan_id")))

    async def get_pool(self, name: str) -> PoolDoc | None:
        """The pool named ``name``."""
        return self._get(POOLS, name)

    async def pool_by_vlan(self, dc: str, vlan_id: int) -> PoolDoc | None:
        """The pool of ``vlan_id`` in ``dc``."""
        found = self._find(POOLS, lambda d: d["dc"] == dc and d["vlan_id"] == vlan_id)
        return found[0] if found else None

    async def list_pools(self, dc: str | None = None) -> list[PoolDoc]:
        """Every pool (of ``dc``), by name."""
        return sorted(
            self._find(POOLS, lambda d: dc is None or d["dc"] == dc), key=lambda d: d["_id"]
        )

    async def pools_containing(self, ip_int: int) -> list[PoolDoc]:
        """Pools, current and deleted, whose cidr holds ``ip_int``."""

        def hit(d: dict) -> bool:
            return d["first"] <= ip_int <= d["last"]

        return [*self._find(POOLS, hit), *self._find(ARCHIVE, hit)]

    async def overlapping_pools(self, first: int, last: int, uid: str) -> list[PoolDoc]:
        """Other current pools sharing an address with ``[first, last]``."""
        return self._find(
            POOLS, lambda d: d["first"] <= last and d["last"] >= first and d["uid"] != uid
        )

    async def update_pool(self, name: str, fields: PoolChanges) -> None:
        """Set ``fields`` on the pool."""
        if name in self.c[POOLS]:
            self.c[POOLS][name].update(copy.deepcopy(fields))

    async def raise_hint(self, name: str, field: HintField, value: int) -> None:
        """Raise a hint counter."""
        doc = self.c[POOLS].get(name)
        if doc is not None:
            doc[field] = max(doc.get(field, 0), value)

    async def delete_pool(self, doc: PoolDoc) -> None:
        """Archive the pool and drop its queue and blocks."""
        uid = doc["uid"]
        self.c[ARCHIVE][uid] = {**copy.deepcopy(doc), "_id": uid}
        for coll in (FREE, BLOCKS):
            for k in [k for k, d in self.c[coll].items() if d["pool_uid"] == uid]:
                del self.c[coll][k]
        for k in [k for k, d in self.c[POOLS].items() if d["uid"] == uid]:
            del self.c[POOLS][k]

    async def insert_lease(self, doc: LeaseDoc) -> None:
        """Insert an active lease."""
        self._insert(LEASES, doc, (("active_ip",),))

    async def get_lease(self, machine_id: str) -> LeaseDoc | None:
        """The machine's active lease."""
        return self._get(LEASES, machine_id)

    async def delete_lease(self, machine_id: str, ip: str, claim_id: str | None = None) -> bool:
        """Drop the machine's active lease of ``ip`` (of that claim, if named)."""
        doc = self.c[LEASES].get(machine_id)
        if doc is None or doc["active_ip"] != ip:
            return False
        if claim_id is not None and doc.get("claim_id") != claim_id:
            return False
        del self.c[LEASES][machine_id]
        return True

    async def end_lease(self, machine_id: str, ip: str, at: datetime) -> None:
        """Turn the active lease into a tombstone."""
        doc = self.c[LEASES].get(machine_id)
        if doc is not None and doc["active_ip"] == ip:
            doc.update(state="released", released_at=at, active_ip=f"released:{machine_id}")

    async def lease_of_ip(self, ip: str) -> LeaseDoc | None:
        """The active lease of ``ip``."""
        found = self._find(LEASES, lambda d: d["active_ip"] == ip)
        return found[0] if found else None

    async def leases_of_pool(self, pool_uid: str) -> list[LeaseDoc]:
        """Active leases of a pool."""
        return self._find(LEASES, lambda d: d["pool_uid"] == pool_uid and d["state"] == "active")

    async def leases_of_request(self, request_id: str) -> list[LeaseDoc]:
        """Active leases made for a bulk request."""
        return self._find(
            LEASES, lambda d: d.get("request_id") == request_id and d["state"] == "active"
        )

    async def get_history(self, hid: str) -> HistoryDoc | None:
        """One history record."""
        return self._get(HISTORY, hid)

    async def insert_history(self, doc: HistoryDoc) -> None:
        """Insert a history record."""
        self._insert(HISTORY, doc)

    async def upsert_history(
        self, hid: str, fields: HistoryFields, on_insert: HistoryFields | None = None
    ) -> None:
        """Create or complete a history record (``on_insert`` only when creating it)."""
        if hid not in self.c[HISTORY]:
            self.c[HISTORY][hid] = {"_id": hid, **copy.deepcopy(on_insert or {})}
        self.c[HISTORY][hid].update(copy.deepcopy(fields))

    async def delete_history(self, hid: str) -> None:
        """Forget a history record."""
        self.c[HISTORY].pop(hid, None)

    async def history_of_machine(self, machine_id: str) -> HistoryDoc | None:
        """The machine's latest history record."""
        found = self._find(HISTORY, lambda d: d.get("machine_id") == machine_id)
        return max(found, key=lambda d: d["allocated_at"]) if found else None

    async def released_since(self, pool_uid: str, since: datetime) -> int:
        """Releases in the pool after ``since``."""
        return len(
            self._find(
                HISTORY,
                lambda d: (
                    d.get("pool_uid") == pool_uid
                    and d.get("released_at") is not None
                    and d["released_at"] > since
                    and d.get("ever_ran", True) is not False
                ),
            )
        )

    async def get_slot(self, sid: str) -> FreeSlotDoc | None:
        """One entry of a free queue."""
        return self._get(FREE, sid)

    async def insert_slot(self, doc: FreeSlotDoc) -> bool:
        """Append at ``doc['_id']``."""
        if doc["_id"] in self.c[FREE]:
            return False
        self.c[FREE][doc["_id"]] = copy.deepcopy(doc)
        return True

    async def claim_cleanup(self, doc: CleanupDoc) -> bool:
        """Insert a cleanup marker; False if that round has a winner already."""
        try:
            self._insert(CLEANUPS, doc)
        except LeaseConflict:
            return False
        return True

    async def get_cleanup(self, cid: str) -> CleanupDoc | None:
        """One cleanup marker."""
        return self._get(CLEANUPS, cid)

    async def claim_block(self, pool_uid: str, k: int, owner: str, at: datetime) -> bool:
        """Claim block ``k``."""
        key = f"{pool_uid}:{k}"
        if key in self.c[BLOCKS]:
            return False
        self.c[BLOCKS][key] = {
            "_id": key,
            "pool_uid": pool_uid,
            "k": k,
            "owner": owner,
            "at": at,
            "full": False,
        }
        return True

    async def open_blocks(self, pool_uid: str) -> list[int]:
        """Claimed blocks not known to be used up."""
        return sorted(
            d["k"] for d in self.c[BLOCKS].values() if d["pool_uid"] == pool_uid and not d["full"]
        )

    async def mark_block_full(self, pool_uid: str, k: int) -> None:
        """Record that block ``k`` is used up."""
        doc = self.c[BLOCKS].get(f"{pool_uid}:{k}")
        if doc is not None:
            doc["full"] = True
