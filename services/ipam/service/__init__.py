"""ipam's use cases: pools, allocate (one or many), release, and the queries.

:class:`Ipam` is the facade the bus handlers call; the work is done by its parts:

- :mod:`.pools`: pool definitions and their cache (create, update, delete);
- :mod:`.allocator`: address sources (blocks of never-used addresses, their leftovers, the
  free queue of released ones) and what this replica remembers of them;
- :mod:`.claims`: the claim protocol (the lease insert under a unique index, the history
  generation check, stale-claim cleanup, release records, bulk rollback);
- :mod:`.queries`: read paths (pool usage, an IP's state and history).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Address

from libs.common.clock import utcnow

from ..documents import ReleasedIp
from ..domain import Pool
from ..store import IpamStore
from .allocator import AddressSources
from .claims import Allocation, Claims
from .pools import PoolCatalog
from .queries import IpamQueries, IpLookupResult, PoolView

__all__ = ["Allocation", "IpLookupResult", "Ipam", "PoolView"]


@dataclass
class Ipam:
    """ipam's use cases over an :class:`IpamStore`; one instance per process."""

    store: IpamStore
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)  # names this replica's blocks
    block_size: int = 128
    pool_cache_s: float = 1.0
    max_attempts: int = 256
    # A stale claim is undone by its own claimer; another delivery undoes it only once it is
    # this old (its claimer died).
    abandoned_claim_s: float = 15.0
    clock: Callable[[], datetime] = utcnow
    sources: AddressSources = field(init=False, repr=False)
    pools: PoolCatalog = field(init=False, repr=False)
    claims: Claims = field(init=False, repr=False)
    queries: IpamQueries = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.sources = AddressSources(
            self.store,
            owner=self.owner,
            clock=self.clock,
            block_size=self.block_size,
            pool_cache_s=self.pool_cache_s,
            max_attempts=self.max_attempts,
        )
        self.pools = PoolCatalog(
            self.store, self.sources, clock=self.clock, cache_s=self.pool_cache_s
        )
        self.claims = Claims(
            self.store,
            self.pools,
            self.sources,
            clock=self.clock,
            max_attempts=self.max_attempts,
            abandoned_claim_s=self.abandoned_claim_s,
        )
        self.queries = IpamQueries(self.store, clock=self.clock)

    async def create_pool(
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
        return await self.pools.create(name, dc, vlan_id, cidr, gateway, reserved, cooldown_s)

    async def update_pool(
        self, name: str, reserved: list[str] | None, cooldown_s: int | None
    ) -> Pool:
        """Change a pool's reserved addresses and/or cooldown."""
        return await self.pools.update(name, reserved, cooldown_s)

    async def delete_pool(self, name: str) -> None:
        """Delete a pool that has no active lease (its history is kept)."""
        await self.pools.delete(name)

    async def allocate(
        self,
        machine_id: str,
        *,
        pool: str | None = None,
        dc: str | None = None,
        vlan_id: int | None = None,
        ip: IPv4Address | None = None,
        request_id: str | None = None,
    ) -> Allocation:
        """Give ``machine_id`` its IP for life (the same one again if it already has one)."""
        return await self.claims.allocate(
            machine_id, pool=pool, dc=dc, vlan_id=vlan_id, ip=ip, request_id=request_id
        )

    async def allocate_many(
        self,
        request_id: str,
        machine_ids: list[str],
        *,
        pool: str | None = None,
        dc: str | None = None,
        vlan_id: int | None = None,
    ) -> list[Allocation]:
        """Give every machine its IP, or none of them."""
        return await self.claims.allocate_many(
            request_id, machine_ids, pool=pool, dc=dc, vlan_id=vlan_id
        )

    async def release(self, machine_id: str, ever_ran: bool = True) -> ReleasedIp | None:
        """Release the machine's IP into cooldown (free at once if the machine never ran);
        None if it had none."""
        return await self.claims.release(machine_id, ever_ran)

    async def list_pools(self, dc: str | None = None) -> list[PoolView]:
        """Every active pool with its usage."""
        return await self.queries.list_pools(dc)

    async def lookup(self, ip: IPv4Address, at: datetime | None = None) -> IpLookupResult:
        """Who holds ``ip`` now (and at ``at``), its state and its whole history."""
        return await self.queries.lookup(ip, at)
