"""Read paths: a pool's usage, and the state, owner and history of one IP.

They write nothing and filter or scan (usage counts, IP lookups), which FerretDB v1 serves by
reading whole collections; that is why they stay off the allocation path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address

from ..documents import HistoryFields
from ..domain import HistoryEvent, Pool, history_of, owner_at
from ..store import IpamStore, history_id
from .pools import pool_of

__all__ = ["IpLookupResult", "IpamQueries", "PoolView"]


@dataclass(frozen=True)
class PoolView:
    """A pool with its usage, for ``pool.listing``."""

    pool: Pool
    total: int
    allocated: int
    cooling: int
    reserved: int
    free: int


@dataclass(frozen=True)
class IpLookupResult:
    """The state, owner and history of one IP."""

    ip: IPv4Address
    pool: str | None
    state: str
    owner: str | None
    owner_at: str | None
    cooling_until: datetime | None
    history: list[HistoryEvent]


@dataclass
class IpamQueries:
    """ipam's read-only use cases."""

    store: IpamStore
    clock: Callable[[], datetime]

    async def list_pools(self, dc: str | None = None) -> list[PoolView]:
        """Every active pool with its usage."""
        out = []
        now = self.clock()
        for doc in await self.store.list_pools(dc):
            if doc["state"] != "active":
                continue
            pool = pool_of(doc)
            allocated = len(await self.store.leases_of_pool(pool.uid))
            cooling = await self.store.released_since(pool.uid, now - pool.cooldown)
            total, reserved = pool.usable_count(), pool.reserved_count()
            free = max(0, total - reserved - allocated - cooling)
            out.append(PoolView(pool, total, allocated, cooling, reserved, free))
        return out

    async def lookup(self, ip: IPv4Address, at: datetime | None = None) -> IpLookupResult:
        """Who holds ``ip`` now (and at ``at``), its state and its whole history."""
        ip_int, addr = int(ip), str(ip)
        pools = await self.store.pools_containing(ip_int)
        records: list[HistoryFields] = []
        for doc in pools:
            gen = 0
            while h := await self.store.get_history(history_id(addr, doc["uid"], gen + 1)):
                records.append(h)
                gen += 1
        active = await self.store.lease_of_ip(addr)
        if active is not None and not any(
            r["pool_uid"] == active["pool_uid"] and r["gen"] == active["gen"] for r in records
        ):
            records.append(
                {
                    "machine_id": active["_id"],
                    "allocated_at": active["allocated_at"],
                    "released_at": None,
                    "pool": active["pool"],
                    "gen": active["gen"],
                }
            )
        events = list(history_of(records))
        then = owner_at(records, at) if at is not None else None
        # A deleted pool's archived copy has its uid as _id: only a current pool names the IP.
        current = [p for p in pools if p.get("state") == "active" and p["_id"] != p["uid"]]
        if not current:
            return IpLookupResult(ip, None, "unknown", None, then, None, events)
        pool = pool_of(current[0])
        if active is not None:
            return IpLookupResult(ip, pool.name, "active", active["_id"], then, None, events)
        if not pool.allocatable(ip_int):
            return IpLookupResult(ip, pool.name, "reserved", None, then, None, events)
        # A release whose machine never ran did not cool down.
        mine = [
            r
            for r in records
            if r.get("pool_uid") == pool.uid
            and r.get("released_at")
            and r.get("ever_ran", True) is not False
        ]
        last = max((r["released_at"] for r in mine), default=None)
        if last is not None and last + pool.cooldown > self.clock():
            cooling_until = last + pool.cooldown
            return IpLookupResult(ip, pool.name, "cooling", None, then, cooling_until, events)
        return IpLookupResult(ip, pool.name, "free", None, then, None, events)
