"""Pool definitions: create, update, delete, and this replica's short-lived cache of them.

A pool is only *active* once its create has checked its neighbours; two overlapping creates
may both pass that check, and the older one (by creation time, then uid) wins. Every command is
idempotent by pool name: a redelivered create finishes what the first delivery started.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address

from libs.common.errors import TransientError

from ..documents import LeaseDoc, PoolChanges, PoolDoc
from ..domain import (
    AllocationError,
    Pool,
    PoolRejectedError,
    parse_reserved,
    subtract_ranges,
    validate_pool,
)
from ..store import IpamStore, LeaseConflict
from .allocator import EPOCH, AddressSources

__all__ = ["PoolCatalog", "pool_doc", "pool_of"]

_SPEC_FIELDS = ("dc", "vlan_id", "cidr", "gateway", "reserved", "cooldown_s")


def pool_doc(pool: Pool, state: str, created_at: datetime) -> PoolDoc:
    """The stored form of a pool."""
    return {
        "_id": pool.name,
        "uid": pool.uid,
        "dc": pool.dc,
        "vlan_id": pool.vlan_id,
        "cidr": str(pool.network),
        "gateway": str(pool.gateway),
        "reserved": list(pool.reserved_items),
        "cooldown_s": pool.cooldown_s,
        "first": pool.first,
        "last": pool.first + pool.size - 1,
        "state": state,
        "created_at": created_at,
        "block_hint": -1,
        "free_head": 0,
        "free_tail": 0,
    }


def pool_of(doc: PoolDoc) -> Pool:
    """A pool from its stored form."""
    return validate_pool(
        doc["_id"],
        doc["dc"],
        doc["vlan_id"],
        doc["cidr"],
        IPv4Address(doc["gateway"]),
        doc["reserved"],
        doc["cooldown_s"],
        doc["uid"],
    )


def _same_spec(doc: PoolDoc, pool: Pool) -> bool:
    mine = pool_doc(pool, "", EPOCH)
    return all(doc[k] == mine[k] for k in _SPEC_FIELDS)


@dataclass
class PoolCatalog:
    """The pools, as commands change them and as allocations read them (cached briefly)."""

    store: IpamStore
    sources: AddressSources  # told when a pool's addresses change or it goes
    clock: Callable[[], datetime]
    cache_s: float = 1.0
    _cached: dict[object, tuple[float, Pool]] = field(default_factory=dict)

    async def active(
        self, name: str | None, dc: str | None = None, vlan_id: int | None = None
    ) -> Pool:
        """The active pool named ``name``, or else of ``vlan_id`` in ``dc`` (cached)."""
        key: object = name if name is not None else (dc, vlan_id)
        hit = self._cached.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.cache_s:
            return hit[1]
        if name is not None:
            doc = await self.store.get_pool(name)
        elif vlan_id is not None and 1 <= vlan_id <= 4094 and dc is not None:
            doc = await self.store.pool_by_vlan(dc, vlan_id)
        else:
            doc = None
        if doc is None or doc.get("state") != "active":
            what = name if name is not None else f"vlan {vlan_id} in {dc}"
            raise AllocationError("unknown_pool", f"no pool {what}")
        pool = pool_of(doc)
        if (dc is not None and dc != pool.dc) or (vlan_id is not None and vlan_id != pool.vlan_id):
            raise AllocationError("invalid", f"pool {name} is not vlan {vlan_id} in {dc}")
        self._cached[key] = (time.monotonic(), pool)
        return pool

    async def of_lease(self, lease: LeaseDoc) -> Pool:
        """The pool of an existing lease, whatever the pool's state (it cannot be gone)."""
        try:
            return await self.active(lease["pool"])
        except AllocationError:
            doc = await self.store.get_pool(lease["pool"])
            if doc is None:
                raise TransientError(f"pool {lease['pool']} of a lease is missing") from None
            return pool_of(doc)

    async def create(
        self,
        name: str,
        dc: str,
        vlan_id: int,
        cidr: str,
        gateway: IPv4Address,
        reserved: list[str],
        cooldown_s: int,
    ) -> Pool:
        """Create a pool; :class:`PoolRejectedError` (nothing changed) when it is invalid."""
        pool = validate_pool(name, dc, vlan_id, cidr, gateway, reserved, cooldown_s, uid="")
        existing = await self.store.get_pool(name)
        if existing is not None:
            if not _same_spec(existing, pool):
                raise PoolRejectedError("exists", f"pool {name} exists with another definition")
            pool = pool_of(existing)  # a redelivered create: finish what it started
        else:
            pool = validate_pool(
                name, dc, vlan_id, cidr, gateway, reserved, cooldown_s, uuid.uuid4().hex
            )
            await self._check_neighbours(pool)
            try:
                await self.store.insert_pool(pool_doc(pool, "pending", self.clock()))
            except LeaseConflict as err:
                await self._check_neighbours(pool)
                raise PoolRejectedError("exists", f"pool {name} already exists") from err
        # Two overlapping creates may both pass the check above; the older one wins.
        mine = await self.store.get_pool(name)
        if mine is None:
            raise PoolRejectedError("deleted", f"pool {name} was deleted while it was created")
        last = pool.first + pool.size - 1
        for other in await self.store.overlapping_pools(pool.first, last, pool.uid):
            if (other["created_at"], other["uid"]) < (mine["created_at"], mine["uid"]):
                await self.store.delete_pool(mine)
                raise PoolRejectedError(
                    "overlap", f"{pool.network} overlaps pool {other['_id']} ({other['cidr']})"
                )
        await self.store.update_pool(name, {"state": "active"})
        return pool

    async def _check_neighbours(self, pool: Pool) -> None:
        """Refuse a pool whose name or vlan is taken, or whose cidr overlaps another pool."""
        if await self.store.get_pool(pool.name) is not None:
            raise PoolRejectedError("exists", f"pool {pool.name} already exists")
        taken = await self.store.pool_by_vlan(pool.dc, pool.vlan_id)
        if taken is not None:
            raise PoolRejectedError(
                "vlan_taken", f"vlan {pool.vlan_id} of {pool.dc} is pool {taken['_id']}"
            )
        others = await self.store.overlapping_pools(
            pool.first, pool.first + pool.size - 1, pool.uid
        )
        if others:
            first = others[0]
            raise PoolRejectedError(
                "overlap", f"{pool.network} overlaps pool {first['_id']} ({first['cidr']})"
            )

    async def update(self, name: str, reserved: list[str] | None, cooldown_s: int | None) -> Pool:
        """Change a pool's reserved addresses and/or cooldown."""
        doc = await self.store.get_pool(name)
        if doc is None or doc["state"] != "active":
            raise PoolRejectedError("unknown_pool", f"no pool {name}")
        old = pool_of(doc)
        if cooldown_s is not None and cooldown_s < 0:
            raise PoolRejectedError("invalid", "cooldown_s must not be negative")
        changes: PoolChanges = {}
        if cooldown_s is not None:
            changes["cooldown_s"] = cooldown_s
        unreserved: tuple[tuple[int, int], ...] = ()
        if reserved is not None:
            new_ranges = parse_reserved(reserved, old.network)
            added = subtract_ranges(new_ranges, old.reserved)
            leased = [
                lease["ip"]
                for lease in await self.store.leases_of_pool(old.uid)
                if any(lo <= int(IPv4Address(lease["ip"])) <= hi for lo, hi in added)
            ]
            if leased:
                raise PoolRejectedError(
                    "ip_taken", f"cannot reserve leased {', '.join(sorted(leased)[:5])}"
                )
            changes["reserved"] = list(reserved)
            unreserved = subtract_ranges(old.reserved, new_ranges)
        if changes:
            await self.store.update_pool(name, changes)
        new = pool_of({**doc, **changes})
        for lo, hi in unreserved:
            await self.sources.requeue_unreserved(new, doc, lo, hi)
        self._cached.clear()
        self.sources.forget_no_block_left(old.uid)
        return new

    async def delete(self, name: str) -> None:
        """Delete a pool that has no active lease (its history is kept)."""
        doc = await self.store.get_pool(name)
        if doc is None:
            raise PoolRejectedError("unknown_pool", f"no pool {name}")
        if await self.store.leases_of_pool(doc["uid"]):
            raise PoolRejectedError("pool_in_use", f"pool {name} has active leases")
        # Stop new allocations first, then look again: a lease that raced in keeps the pool.
        await self.store.update_pool(name, {"state": "deleting"})
        if await self.store.leases_of_pool(doc["uid"]):
            await self.store.update_pool(name, {"state": "active"})
            raise PoolRejectedError("pool_in_use", f"pool {name} has active leases")
        await self.store.delete_pool(doc)
        self._cached.clear()
        self.sources.forget_pool(doc["uid"])
