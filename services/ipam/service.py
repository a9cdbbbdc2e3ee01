"""The ipam use cases: pools, allocate (one or many), release, and the queries.

How an allocation finds an address without scanning the pool, in order of preference:

1. a never-used offset from this replica's current *block* (a run of ``block_size`` offsets
   claimed by inserting ``ip_blocks/<pool>:<k>``: one write per block, not per address);
2. a never-used offset left in a claimed block that is not used up (a replica was killed, or
   another replica's block is still being handed out): bounded by the open blocks;
3. the least recently released address whose cooldown has passed (``ip_free`` by time).

Whatever the source, the address is only *taken* by inserting its lease, whose unique keys
(``<pool>:<ip>#<gen>``, the active IP, the active machine) arbitrate between replicas; the
sources are hints. Every step is idempotent by machine_id, and a crash between two writes
leaves state the next attempt (or another replica) repairs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address

import structlog

from libs.common.errors import TransientError

from .domain import (
    AllocationError,
    Pool,
    PoolRejectedError,
    block_offsets,
    history_of,
    lease_id,
    next_block,
    owner_at,
    parse_reserved,
    subtract_ranges,
    validate_pool,
)
from .store import IpamStore, LeaseConflict

__all__ = ["Allocation", "IpLookupResult", "Ipam", "PoolView", "utcnow"]

log = structlog.get_logger("ipam")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # release time of never-used addresses: first in line


def utcnow() -> datetime:
    """Now in UTC, at the millisecond precision the database keeps."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


@dataclass(frozen=True)
class Allocation:
    """An active lease as announced in ``ip.allocated``."""

    machine_id: str
    ip: IPv4Address
    prefix_len: int
    gateway: IPv4Address
    vlan_id: int
    pool: str
    dc: str

    @classmethod
    def of(cls, lease: dict) -> Allocation:
        """Build from a lease record."""
        return cls(
            lease["machine_id"], IPv4Address(lease["ip"]), lease["prefix_len"],
            IPv4Address(lease["gateway"]), lease["vlan_id"], lease["pool"], lease["dc"],
        )


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
    history: list


@dataclass
class _Block:
    pool_uid: str
    k: int
    first: int  # the pool's network address: queue items are offsets from it
    queue: deque[int]
    unresolved: int  # handed-out offsets whose insert has not finished yet, plus the queue


@dataclass(frozen=True)
class _Candidate:
    ip: int
    gen: int  # the last lease's gen; the claim inserts gen + 1
    free_id: str | None = None
    block: _Block | None = None


def pool_doc(pool: Pool, state: str, created_at: datetime) -> dict:
    """The stored form of a pool."""
    return {
        "_id": pool.name, "uid": pool.uid, "dc": pool.dc, "vlan_id": pool.vlan_id,
        "cidr": str(pool.network), "gateway": str(pool.gateway),
        "reserved": list(pool.reserved_items), "cooldown_s": pool.cooldown_s,
        "first": pool.first, "last": pool.first + pool.size - 1,
        "state": state, "created_at": created_at,
    }


def pool_of(doc: dict) -> Pool:
    """A pool from its stored form."""
    return validate_pool(
        doc["_id"], doc["dc"], doc["vlan_id"], doc["cidr"], IPv4Address(doc["gateway"]),
        doc["reserved"], doc["cooldown_s"], doc["uid"],
    )


def _same_spec(doc: dict, pool: Pool) -> bool:
    keys = ("dc", "vlan_id", "cidr", "gateway", "reserved", "cooldown_s")
    mine = pool_doc(pool, "", EPOCH)
    return all(doc[k] == mine[k] for k in keys)


@dataclass
class Ipam:
    """ipam's use cases over an :class:`IpamStore`; one instance per process."""

    store: IpamStore
    owner: str = field(default_factory=lambda: uuid.uuid4().hex)
    block_size: int = 32
    pool_cache_s: float = 1.0
    max_attempts: int = 256
    clock: Callable[[], datetime] = utcnow
    _blocks: dict[str, _Block] = field(default_factory=dict)
    _cursor_done: dict[str, float] = field(default_factory=dict)
    _inflight: set[int] = field(default_factory=set)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _cache: dict[object, tuple[float, Pool]] = field(default_factory=dict)

    # ---------------------------------------------------------------- pools

    async def _pool(self, name: str | None, dc: str | None, vlan_id: int | None) -> Pool:
        key: object = name if name is not None else (dc, vlan_id)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.pool_cache_s:
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
        self._cache[key] = (time.monotonic(), pool)
        return pool

    async def create_pool(
        self, name: str, dc: str, vlan_id: int, cidr: str, gateway: IPv4Address,
        reserved: list[str], cooldown_s: int,
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
        assert mine is not None
        for other in await self.store.overlapping_pools(pool.first, pool.first + pool.size - 1,
                                                       pool.uid):
            if (other["created_at"], other["uid"]) < (mine["created_at"], mine["uid"]):
                await self.store.delete_pool(pool.uid)
                raise PoolRejectedError(
                    "overlap", f"{pool.network} overlaps pool {other['_id']} ({other['cidr']})"
                )
        await self.store.update_pool(name, {"state": "active"})
        return pool

    async def _check_neighbours(self, pool: Pool) -> None:
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
            o = others[0]
            raise PoolRejectedError("overlap", f"{pool.network} overlaps pool {o['_id']} "
                                               f"({o['cidr']})")

    async def update_pool(
        self, name: str, reserved: list[str] | None, cooldown_s: int | None
    ) -> Pool:
        """Change a pool's reserved addresses and/or cooldown."""
        doc = await self.store.get_pool(name)
        if doc is None or doc["state"] != "active":
            raise PoolRejectedError("unknown_pool", f"no pool {name}")
        old = pool_of(doc)
        if cooldown_s is not None and cooldown_s < 0:
            raise PoolRejectedError("invalid", "cooldown_s must not be negative")
        fields: dict = {}
        if cooldown_s is not None:
            fields["cooldown_s"] = cooldown_s
        if reserved is not None:
            new_ranges = parse_reserved(reserved, old.network)
            added = subtract_ranges(new_ranges, old.reserved)
            for lo, hi in added:
                active = await self.store.active_in_range(old.uid, lo, hi)
                if active:
                    ips = ", ".join(sorted(a["ip"] for a in active)[:5])
                    raise PoolRejectedError("ip_taken", f"cannot reserve leased {ips}")
            for lo, hi in added:
                await self.store.delete_free_in_range(old.uid, lo, hi)
            fields["reserved"] = list(reserved)
            new = validate_pool(old.name, old.dc, old.vlan_id, str(old.network), old.gateway,
                                list(reserved), old.cooldown_s, old.uid)
            for lo, hi in subtract_ranges(old.reserved, new_ranges):
                await self._restore_free(new, lo, hi)
        if fields:
            await self.store.update_pool(name, fields)
        self._cache.clear()
        self._cursor_done.pop(old.uid, None)
        return pool_of({**doc, **fields})

    async def _restore_free(self, pool: Pool, lo: int, hi: int) -> None:
        """Put un-reserved addresses of already claimed blocks back on the free list."""
        top = await self.store.max_block(pool.uid)
        if top is None:
            return
        hi = min(hi, pool.first + (top + 1) * self.block_size - 1)
        for ip in range(lo, hi + 1):
            if not pool.allocatable(ip):
                continue
            latest = await self.store.latest_lease_of_ip(pool.uid, ip)
            if latest is None:
                await self.store.add_free(self._free_doc(pool.uid, ip, 0, EPOCH))
            elif latest["state"] == "released":
                await self.store.add_free(
                    self._free_doc(pool.uid, ip, latest["gen"], latest["released_at"])
                )

    async def delete_pool(self, name: str) -> None:
        """Delete a pool that has no active lease (its lease history is kept)."""
        doc = await self.store.get_pool(name)
        if doc is None:
            raise PoolRejectedError("unknown_pool", f"no pool {name}")
        uid = doc["uid"]
        if await self.store.count_active(uid):
            raise PoolRejectedError("pool_in_use", f"pool {name} has active leases")
        # Stop new allocations first, then look again: a lease that raced in keeps the pool.
        await self.store.update_pool(name, {"state": "deleting"})
        if await self.store.count_active(uid):
            await self.store.update_pool(name, {"state": "active"})
            raise PoolRejectedError("pool_in_use", f"pool {name} has active leases")
        await self.store.delete_pool(uid)
        self._cache.clear()
        self._blocks.pop(uid, None)

    async def list_pools(self, dc: str | None = None) -> list[PoolView]:
        """Every active pool with its usage."""
        out = []
        now = self.clock()
        for doc in await self.store.list_pools(dc):
            if doc["state"] != "active":
                continue
            pool = pool_of(doc)
            allocated = await self.store.count_active(pool.uid)
            cooling = await self.store.count_cooling(pool.uid, now - pool.cooldown)
            total, reserved = pool.usable_count(), pool.reserved_count()
            free = max(0, total - reserved - allocated - cooling)
            out.append(PoolView(pool, total, allocated, cooling, reserved, free))
        return out

    # ------------------------------------------------------------- allocate

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
        existing = await self.store.active_lease_of_machine(machine_id)
        if existing is not None:
            if ip is not None and existing["ip"] != str(ip):
                raise AllocationError(
                    "machine_has_ip", f"{machine_id} already holds {existing['ip']}"
                )
            return Allocation.of(existing)
        p = await self._pool(pool, dc, vlan_id)
        if ip is not None:
            return await self._allocate_exact(p, machine_id, int(ip), request_id)
        for _ in range(self.max_attempts):
            cand = await self._candidate(p)
            if cand is None:
                raise AllocationError("pool_exhausted", f"pool {p.name} has no free address")
            got = await self._try(p, machine_id, cand, request_id)
            if got is not None:
                return got
        raise TransientError(f"no address claimed in pool {p.name} after "
                             f"{self.max_attempts} contended attempts")

    async def _allocate_exact(
        self, pool: Pool, machine_id: str, ip: int, request_id: str | None
    ) -> Allocation:
        addr = IPv4Address(ip)
        reason = pool.why_not_allocatable(ip)
        if reason is not None:
            raise AllocationError(reason, f"{addr} cannot be allocated in pool {pool.name}")
        latest = await self.store.latest_lease_of_ip(pool.uid, ip)
        if latest is not None and latest["state"] == "active":
            raise AllocationError("ip_taken", f"{addr} is held by {latest['machine_id']}")
        if latest is not None and latest["released_at"] > self.clock() - pool.cooldown:
            until = latest["released_at"] + pool.cooldown
            raise AllocationError("ip_cooling", f"{addr} cools down until {until.isoformat()}")
        gen = 0 if latest is None else latest["gen"]
        cand = _Candidate(ip, gen, lease_id(pool.uid, ip, gen))
        got = await self._try(pool, machine_id, cand, request_id)
        if got is None:
            raise AllocationError("ip_taken", f"{addr} was taken concurrently")
        return got

    async def _try(
        self, pool: Pool, machine_id: str, cand: _Candidate, request_id: str | None
    ) -> Allocation | None:
        """Insert the lease for ``cand``; None if another claimer won the address."""
        gen = cand.gen + 1
        lid = lease_id(pool.uid, cand.ip, gen)
        ip = str(IPv4Address(cand.ip))
        doc = {
            "_id": lid, "ip": ip, "ip_int": cand.ip, "gen": gen, "pool": pool.name,
            "pool_uid": pool.uid, "dc": pool.dc, "vlan_id": pool.vlan_id,
            "prefix_len": pool.network.prefixlen, "gateway": str(pool.gateway),
            "machine_id": machine_id, "machine_key": machine_id, "active_ip": ip,
            "state": "active", "allocated_at": self.clock(), "released_at": None,
            "request_id": request_id,
        }
        self._inflight.add(cand.ip)
        try:
            try:
                await self.store.insert_lease(doc)
            except LeaseConflict:
                other = await self.store.active_lease_of_machine(machine_id)
                if other is not None:  # a concurrent delivery for the same machine won
                    self._give_back(cand)
                    return Allocation.of(other)
                latest = await self.store.latest_lease_of_ip(pool.uid, cand.ip)
                if cand.free_id is not None and latest is not None and latest["gen"] > cand.gen:
                    await self.store.delete_free(cand.free_id)  # stale: already handed out
                await self._resolve(cand)
                return None
            except BaseException:
                self._give_back(cand)
                raise
            await self._resolve(cand)
            if cand.free_id is not None:
                await self.store.delete_free(cand.free_id)
            return Allocation.of(doc)
        finally:
            self._inflight.discard(cand.ip)

    def _give_back(self, cand: _Candidate) -> None:
        if cand.block is not None:
            cand.block.queue.appendleft(cand.ip - cand.block.first)

    async def _resolve(self, cand: _Candidate) -> None:
        blk = cand.block
        if blk is None:
            return
        blk.unresolved -= 1
        if blk.unresolved <= 0 and not blk.queue:
            await self.store.mark_block_full(blk.pool_uid, blk.k)

    async def _candidate(self, pool: Pool) -> _Candidate | None:
        """The next address worth trying, never-used first; None when the pool is full."""
        for _ in range(self.max_attempts):
            blk = self._blocks.get(pool.uid)
            while blk is not None and blk.queue:
                ip = pool.first + blk.queue.popleft()
                if ip in self._inflight or not pool.allocatable(ip):
                    await self._resolve(_Candidate(ip, 0, None, blk))
                    continue
                return _Candidate(ip, 0, None, blk)
            if not await self._claim_block(pool):
                break
        leftover = await self._leftover(pool)
        if leftover is not None:
            return leftover
        cutoff = self.clock() - pool.cooldown
        for free in await self.store.free_candidates(pool.uid, cutoff, len(self._inflight) + 8):
            if free["ip_int"] in self._inflight or not pool.allocatable(free["ip_int"]):
                continue
            return _Candidate(free["ip_int"], free["gen"], free["_id"])
        return None

    async def _claim_block(self, pool: Pool) -> bool:
        """Claim the next block of never-used offsets; False when none is left."""
        lock = self._locks.setdefault(pool.uid, asyncio.Lock())
        async with lock:
            blk = self._blocks.get(pool.uid)
            if blk is not None and blk.queue:
                return True  # another task of this process claimed one meanwhile
            done = self._cursor_done.get(pool.uid)
            if done is not None and time.monotonic() - done < 5 * self.pool_cache_s:
                return False
            top = await self.store.max_block(pool.uid)
            k: int | None = 0 if top is None else top + 1
            for _ in range(self.max_attempts):
                k = next_block(pool, k, self.block_size) if k is not None else None
                if k is None:
                    self._cursor_done[pool.uid] = time.monotonic()
                    return False
                if await self.store.claim_block(pool.uid, k, self.owner, self.clock()):
                    offsets = block_offsets(pool, k, self.block_size)
                    self._blocks[pool.uid] = _Block(
                        pool.uid, k, pool.first, deque(offsets), len(offsets)
                    )
                    return True
                k += 1
            raise TransientError(f"could not claim a block of pool {pool.name}")

    async def _leftover(self, pool: Pool) -> _Candidate | None:
        """A never-used address of a claimed block that is not used up (e.g. its owner died)."""
        for k in await self.store.open_blocks(pool.uid):
            offsets = block_offsets(pool, k, self.block_size)
            if not offsets:
                await self.store.mark_block_full(pool.uid, k)
                continue
            lo, hi = pool.first + offsets[0], pool.first + offsets[-1]
            used = await self.store.leased_in_range(pool.uid, lo, hi)
            todo = [pool.first + o for o in offsets if pool.first + o not in used]
            free = [ip for ip in todo if ip not in self._inflight]
            if free:
                return _Candidate(free[0], 0, None)
            if not todo:
                await self.store.mark_block_full(pool.uid, k)
        return None

    async def allocate_many(
        self,
        request_id: str,
        machine_ids: list[str],
        *,
        pool: str | None = None,
        dc: str | None = None,
        vlan_id: int | None = None,
    ) -> list[Allocation]:
        """Give every machine its IP, or none of them (leases made here are rolled back)."""
        if len(set(machine_ids)) != len(machine_ids):
            raise AllocationError("invalid", "machine_ids has duplicates")
        await self._pool(pool, dc, vlan_id)
        done = []
        try:
            for mid in machine_ids:
                done.append(
                    await self.allocate(mid, pool=pool, dc=dc, vlan_id=vlan_id,
                                        request_id=request_id)
                )
        except AllocationError:
            await self._rollback(request_id)
            raise
        return done

    async def _rollback(self, request_id: str) -> None:
        """Undo the (never announced) leases of a failed bulk request, without cooldown."""
        for lease in await self.store.leases_of_request(request_id):
            gen = lease["gen"] - 1
            if gen == 0:
                released_at = EPOCH
            else:
                prev = await self.store.get_lease(lease_id(lease["pool_uid"], lease["ip_int"], gen))
                released_at = EPOCH if prev is None else prev["released_at"]
            await self.store.add_free(
                self._free_doc(lease["pool_uid"], lease["ip_int"], gen, released_at)
            )
            await self.store.delete_lease(lease["_id"])
            log.info("bulk allocation rolled back", machine_id=lease["machine_id"],
                     ip=lease["ip"], request_id=request_id)

    # -------------------------------------------------------------- release

    @staticmethod
    def _free_doc(pool_uid: str, ip: int, gen: int, released_at: datetime) -> dict:
        return {"_id": lease_id(pool_uid, ip, gen), "pool_uid": pool_uid, "ip_int": ip,
                "ip": str(IPv4Address(ip)), "gen": gen, "released_at": released_at}

    async def release(self, machine_id: str) -> dict | None:
        """Release the machine's IP into cooldown; return its lease, None if it never had one."""
        lease = await self.store.active_lease_of_machine(machine_id)
        if lease is not None:
            now = self.clock()
            await self.store.mark_released(lease["_id"], now)
            await self.store.add_free(
                self._free_doc(lease["pool_uid"], lease["ip_int"], lease["gen"], now)
            )
            return {**lease, "state": "released", "released_at": now}
        last = await self.store.last_lease_of_machine(machine_id)
        if last is None:
            return None
        # A redelivery after a crash between the two writes above: finish the second one.
        latest = await self.store.latest_lease_of_ip(last["pool_uid"], last["ip_int"])
        if latest is not None and latest["_id"] == last["_id"]:
            await self.store.add_free(self._free_doc(
                last["pool_uid"], last["ip_int"], last["gen"], last["released_at"]
            ))
        return last

    # -------------------------------------------------------------- queries

    async def lookup(self, ip: IPv4Address, at: datetime | None = None) -> IpLookupResult:
        """Who holds ``ip`` now (and at ``at``), its state and its whole history."""
        ip_int = int(ip)
        history = await self.store.leases_of_ip(str(ip))
        events = list(history_of(history))
        then = owner_at(history, at) if at is not None else None
        pools = await self.store.overlapping_pools(ip_int, ip_int, uid="")
        active = [p for p in pools if p["state"] == "active"]
        if not active:
            return IpLookupResult(ip, None, "unknown", None, then, None, events)
        pool = pool_of(active[0])
        latest = await self.store.latest_lease_of_ip(pool.uid, ip_int)
        owner, state, until = None, "free", None
        if latest is not None and latest["state"] == "active":
            owner, state = latest["machine_id"], "active"
        elif not pool.allocatable(ip_int):
            state = "reserved"
        elif latest is not None and latest["released_at"] + pool.cooldown > self.clock():
            state, until = "cooling", latest["released_at"] + pool.cooldown
        return IpLookupResult(ip, pool.name, state, owner, then, until, events)
