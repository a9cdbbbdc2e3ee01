"""The ipam use cases: pools, allocate (one or many), release, and the queries.

An allocation never scans the pool. In order of preference it takes:

1. a never-used offset from this replica's current *block* (``block_size`` offsets claimed by
   inserting ``ip_blocks/<pool>:<k>``: one write per block, not per address);
2. a never-used offset left in a claimed block that is not used up (its replica was killed, or
   is slow): only when no block is left, bounded by the open blocks;
3. the least recently released address whose cooldown has passed, walking the pool's free
   queue (``ip_free/<pool>:<seq>``) from its head, by ``_id`` reads only.

Whatever the source, the address is only *taken* by inserting the lease, whose unique keys
(the machine as ``_id``, the active IP) arbitrate between replicas; the sources are hints.
A released address is re-taken by also inserting its next ``ip_history`` generation, so a slow
replica holding a stale candidate can never hand out an address still cooling down; a never-used
address is checked the same way right after its insert. Every step is idempotent by
machine_id, and a crash between two writes leaves state that a retry or the walk repairs.
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
    next_block,
    owner_at,
    parse_reserved,
    subtract_ranges,
    validate_pool,
)
from .store import IpamStore, LeaseConflict, history_id, slot_id

__all__ = ["Allocation", "IpLookupResult", "Ipam", "PoolView", "utcnow"]

log = structlog.get_logger("ipam")
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # "released" time of never-used addresses


def utcnow() -> datetime:
    """Now in UTC, at the millisecond precision the database keeps."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def _refuse_released(lease: dict) -> None:
    if lease.get("state") == "released":
        raise AllocationError(
            "machine_released", f"{lease['_id']} released {lease['ip']}; its IP is not renewed"
        )


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
            lease["_id"], IPv4Address(lease["ip"]), lease["prefix_len"],
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
    unresolved: int  # offsets not yet tried to the end (queued or in flight)


@dataclass
class _FreeQueue:
    """This replica's view of a pool's free queue: entries are immutable, so they are cached."""

    head: int = 0  # every entry below is consumed
    tail: int = 0  # next sequence number to append at (a lower bound)
    persisted_head: int = 0
    entries: dict[int, dict] = field(default_factory=dict)
    consumed: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class _Candidate:
    ip: int
    gen: int  # the address's last gen; the claim takes gen + 1
    seq: int | None = None  # free-queue entry, for released addresses
    block: _Block | None = None


def pool_doc(pool: Pool, state: str, created_at: datetime) -> dict:
    """The stored form of a pool."""
    return {
        "_id": pool.name, "uid": pool.uid, "dc": pool.dc, "vlan_id": pool.vlan_id,
        "cidr": str(pool.network), "gateway": str(pool.gateway),
        "reserved": list(pool.reserved_items), "cooldown_s": pool.cooldown_s,
        "first": pool.first, "last": pool.first + pool.size - 1,
        "state": state, "created_at": created_at,
        "block_hint": -1, "free_head": 0, "free_tail": 0,
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
    block_size: int = 128
    pool_cache_s: float = 1.0
    max_attempts: int = 256
    # A stale claim is undone by its own claimer; another delivery undoes it only once it is
    # this old (its claimer died): see _confirmed.
    abandoned_claim_s: float = 15.0
    clock: Callable[[], datetime] = utcnow
    _blocks: dict[str, _Block] = field(default_factory=dict)
    _cursor_done: dict[str, float] = field(default_factory=dict)
    _leftover_empty: dict[str, float] = field(default_factory=dict)
    _used: set[tuple[str, int]] = field(default_factory=set)  # addresses known to be used
    _inflight: set[int] = field(default_factory=set)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _cache: dict[object, tuple[float, Pool, dict]] = field(default_factory=dict)
    _queues: dict[str, _FreeQueue] = field(default_factory=dict)

    # ---------------------------------------------------------------- pools

    async def _pool_and_doc(
        self, name: str | None, dc: str | None, vlan_id: int | None
    ) -> tuple[Pool, dict]:
        key: object = name if name is not None else (dc, vlan_id)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < self.pool_cache_s:
            return hit[1], hit[2]
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
        self._cache[key] = (time.monotonic(), pool, doc)
        return pool, doc

    async def _pool(self, name: str | None, dc: str | None, vlan_id: int | None) -> Pool:
        return (await self._pool_and_doc(name, dc, vlan_id))[0]

    async def _pool_of_lease(self, lease: dict) -> Pool:
        """The pool of an existing lease, whatever the pool's state (it cannot be gone)."""
        try:
            return await self._pool(lease["pool"], None, None)
        except AllocationError:
            doc = await self.store.get_pool(lease["pool"])
            if doc is None:
                raise TransientError(f"pool {lease['pool']} of a lease is missing") from None
            return pool_of(doc)

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
            raise PoolRejectedError(
                "overlap", f"{pool.network} overlaps pool {o['_id']} ({o['cidr']})"
            )

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
        restore: tuple = ()
        if reserved is not None:
            new_ranges = parse_reserved(reserved, old.network)
            added = subtract_ranges(new_ranges, old.reserved)
            leased = [lease["ip"] for lease in await self.store.leases_of_pool(old.uid)
                      if any(lo <= int(IPv4Address(lease["ip"])) <= hi for lo, hi in added)]
            if leased:
                raise PoolRejectedError("ip_taken",
                                        f"cannot reserve leased {', '.join(sorted(leased)[:5])}")
            fields["reserved"] = list(reserved)
            restore = subtract_ranges(old.reserved, new_ranges)
        if fields:
            await self.store.update_pool(name, fields)
        new = pool_of({**doc, **fields})
        for lo, hi in restore:
            await self._restore(new, doc, lo, hi)
        self._cache.clear()
        self._cursor_done.pop(old.uid, None)
        return new

    async def _restore(self, pool: Pool, doc: dict, lo: int, hi: int) -> None:
        """Queue un-reserved addresses of already claimed blocks (later blocks find them)."""
        claimed_end = pool.first + (doc.get("block_hint", -1) + 1) * self._bs(pool) - 1
        for ip in range(lo, min(hi, claimed_end) + 1):
            if not pool.allocatable(ip):
                continue
            gen, last = await self._latest(pool, ip)
            active = await self.store.lease_of_ip(str(IPv4Address(ip)))
            if active is None:
                released = EPOCH if last is None else last.get("released_at") or EPOCH
                await self._append(pool, ip, gen, released)

    async def delete_pool(self, name: str) -> None:
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
        self._cache.clear()
        self._blocks.pop(doc["uid"], None)
        self._queues.pop(doc["uid"], None)

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
        if ip is not None:
            existing = await self.store.get_lease(machine_id)
            if existing is not None:
                _refuse_released(existing)
                if existing["ip"] != str(ip):
                    raise AllocationError(
                        "machine_has_ip", f"{machine_id} already holds {existing['ip']}"
                    )
                return Allocation.of(existing)
            p = await self._pool(pool, dc, vlan_id)
            return await self._allocate_exact(p, machine_id, int(ip), request_id)
        # No read first: the lease insert itself finds a machine that already has one
        # (its _id is the machine), which keeps the common path at one write.
        p = await self._pool(pool, dc, vlan_id)
        waits = 0
        for _ in range(self.max_attempts):
            cand = await self._candidate(p)
            if cand is None:
                other = await self.store.get_lease(machine_id)
                if other is not None:  # a concurrent delivery for the same machine
                    _refuse_released(other)
                    if await self._confirmed(other):
                        return Allocation.of(other)
                if (self._inflight or other is not None) and waits < 100:
                    # Claims in flight here may still fail and free their address.
                    waits += 1
                    await asyncio.sleep(0.01)
                    continue
                # pool_exhausted only after a pass that trusts no cached "none left".
                cand = await self._candidate(p, fresh=True)
                if cand is None:
                    raise AllocationError("pool_exhausted", f"pool {p.name} has no free address")
            got = await self._try(p, machine_id, cand, request_id)
            if got is not None:
                return got
        raise TransientError(f"no address claimed in pool {p.name} after "
                             f"{self.max_attempts} contended attempts")

    async def _latest(self, pool: Pool, ip: int) -> tuple[int, dict | None]:
        """The address's last recorded gen and record, by ``_id`` probes (gens are few)."""
        addr, gen, last = str(IPv4Address(ip)), 0, None
        while (doc := await self.store.get_history(history_id(addr, pool.uid, gen + 1))):
            gen, last = gen + 1, doc
        return gen, last

    async def _allocate_exact(
        self, pool: Pool, machine_id: str, ip: int, request_id: str | None
    ) -> Allocation:
        addr = IPv4Address(ip)
        reason = pool.why_not_allocatable(ip)
        if reason is not None:
            raise AllocationError(reason, f"{addr} cannot be allocated in pool {pool.name}")
        holder = await self.store.lease_of_ip(str(addr))
        if holder is not None:
            raise AllocationError("ip_taken", f"{addr} is held by {holder['_id']}")
        gen, last = await self._latest(pool, ip)
        released = None if last is None else last.get("released_at")
        if released is not None and released > self.clock() - pool.cooldown:
            until = released + pool.cooldown
            raise AllocationError("ip_cooling", f"{addr} cools down until {until.isoformat()}")
        got = await self._try(pool, machine_id, _Candidate(ip, gen, seq=-1), request_id)
        if got is None:
            raise AllocationError("ip_taken", f"{addr} was taken concurrently")
        return got

    def _lease_doc(self, pool: Pool, machine_id: str, cand: _Candidate,
                   request_id: str | None) -> dict:
        ip = str(IPv4Address(cand.ip))
        # "probe": a never-used address, checked after the insert by reading gen 1's history;
        # "history": a re-used address, claimed by inserting its next history generation.
        claim = "probe" if cand.seq is None and cand.gen == 0 else "history"
        return {
            "claim": claim,
            "_id": machine_id, "active_ip": ip, "ip": ip, "gen": cand.gen + 1,
            "pool": pool.name, "pool_uid": pool.uid, "dc": pool.dc, "vlan_id": pool.vlan_id,
            "prefix_len": pool.network.prefixlen, "gateway": str(pool.gateway),
            "allocated_at": self.clock(), "request_id": request_id, "state": "active",
        }

    async def _try(
        self, pool: Pool, machine_id: str, cand: _Candidate, request_id: str | None
    ) -> Allocation | None:
        """Take ``cand`` for the machine; None if another claimer has (or had) the address."""
        doc = self._lease_doc(pool, machine_id, cand, request_id)
        hid = history_id(doc["ip"], pool.uid, doc["gen"])
        # An address goes back to its block only once it has left _inflight: while it is in
        # flight, a task popping it from the block would take it for another task's and drop it.
        give_back = True
        self._inflight.add(cand.ip)
        try:
            for attempt in range(2):
                try:
                    await self.store.insert_lease(doc)
                    break
                except LeaseConflict:
                    other = await self.store.get_lease(machine_id)
                    if other is not None:  # a concurrent delivery for the same machine
                        _refuse_released(other)
                        if await self._confirmed(other):
                            return Allocation.of(other)
                        return None  # a stale claim, undone by its claimer: try again
                    if attempt == 0:
                        continue  # the holder may have just gone (a stale claim undone)
                    give_back = False
                    self._used.add((pool.uid, cand.ip))  # active elsewhere
                    await self._resolve(cand)
                    return None
            give_back = False
            # The lease holds the IP; now make sure this generation was not handed out
            # before (a stale candidate): the history record of a release is written
            # before its lease goes, so a stale claim always sees it here.
            if doc["claim"] == "probe":
                # A record of this very machine is its own release, answered meanwhile through
                # a duplicate delivery that confirmed this lease: the claim held.
                record = await self.store.get_history(hid)
                stale = record is not None and record.get("machine_id") != machine_id
            else:
                try:
                    # Stamped now, after the lease insert succeeded, hence after the previous
                    # holder's release (stamped before its lease ended): "who had this IP at t"
                    # never finds two machines. The lease's own stamp predates the insert.
                    await self.store.insert_history({
                        "_id": hid, "ip": doc["ip"], "pool": pool.name, "pool_uid": pool.uid,
                        "gen": doc["gen"], "machine_id": machine_id,
                        "allocated_at": self.clock(), "released_at": None,
                    })
                    stale = False
                except LeaseConflict:
                    # A duplicate delivery may have finished this very claim for us.
                    record = await self.store.get_history(hid)
                    stale = record is None or record.get("machine_id") != machine_id
            if stale:
                await self.store.delete_lease(machine_id, doc["ip"])
                self._used.add((pool.uid, cand.ip))
                if cand.seq is not None and cand.seq >= 0:
                    self._queue(pool.uid).consumed.add(cand.seq)
                await self._resolve(cand)
                return None
            await self._resolve(cand)
            if cand.seq is not None and cand.seq >= 0:
                self._queue(pool.uid).consumed.add(cand.seq)
            return Allocation.of(doc)
        finally:
            self._inflight.discard(cand.ip)
            if give_back:
                self._give_back(cand)

    async def _confirmed(self, lease: dict) -> bool:
        """Settle another delivery's lease of this machine: True if it holds, False if it is a
        stale claim (the caller tries again).

        A stale claim is deleted by its claimer alone. FerretDB v1 deletes by ``_id`` after
        matching the filter, so a second deleter of the same lease could remove the machine's
        next lease (or its release tombstone) inserted in between: an address held by nobody,
        or a lease nobody releases. Only a claim older than ``abandoned_claim_s`` (its claimer
        died mid-claim) is deleted here."""
        if lease.get("state") != "active":
            return True
        machine, ip = lease["_id"], lease["ip"]
        hid = history_id(ip, lease["pool_uid"], lease["gen"])
        record = await self.store.get_history(hid)
        if lease.get("claim", "history") == "probe":
            holds = record is None or record.get("machine_id") == machine
        else:
            if record is None:  # its claim never finished (the claimer died): finish it
                try:
                    await self.store.insert_history({
                        "_id": hid, "ip": ip, "pool": lease["pool"],
                        "pool_uid": lease["pool_uid"], "gen": lease["gen"],
                        "machine_id": machine, "allocated_at": self.clock(),
                        "released_at": None,
                    })
                except LeaseConflict:
                    record = await self.store.get_history(hid)
                else:
                    record = {"machine_id": machine}
            holds = record is not None and record.get("machine_id") == machine
        if holds:
            return True
        claimed_at = lease["allocated_at"]
        claimed_at = claimed_at if claimed_at.tzinfo else claimed_at.replace(tzinfo=UTC)
        if (self.clock() - claimed_at).total_seconds() >= self.abandoned_claim_s:
            await self.store.delete_lease(machine, ip)
        else:
            await asyncio.sleep(0.02)  # its claimer is about to undo it
        return False

    def _bs(self, pool: Pool) -> int:
        """Block size for ``pool``: large blocks save writes; a small pool gets small blocks
        so that every replica can hold one."""
        return min(self.block_size, max(8, pool.size // 16))

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

    async def _candidate(self, pool: Pool, fresh: bool = False) -> _Candidate | None:
        """The next address worth trying, never-used first; None when the pool is full.

        ``fresh`` looks again where a recent pass found nothing (no block left to claim, no
        leftover), which is what answering ``pool_exhausted`` needs."""
        for _ in range(self.max_attempts):
            blk = self._blocks.get(pool.uid)
            while blk is not None and blk.queue:
                ip = pool.first + blk.queue.popleft()
                if not pool.allocatable(ip):
                    await self._resolve(_Candidate(ip, 0, None, blk))
                    continue
                return _Candidate(ip, 0, None, blk)
            if not await self._claim_block(pool, fresh):
                break
        leftover = await self._leftover(pool, fresh)
        if leftover is not None:
            return leftover
        return await self._next_released(pool)

    async def _claim_block(self, pool: Pool, fresh: bool = False) -> bool:
        """Claim the next block of never-used offsets; False when none is left."""
        lock = self._locks.setdefault(pool.uid, asyncio.Lock())
        async with lock:
            blk = self._blocks.get(pool.uid)
            if blk is not None and blk.queue:
                return True  # another task of this process claimed one meanwhile
            done = None if fresh else self._cursor_done.get(pool.uid)
            if done is not None and time.monotonic() - done < 5 * max(self.pool_cache_s, 0.2):
                return False
            doc = await self.store.get_pool(pool.name)
            hint = -1 if doc is None else doc.get("block_hint", -1)
            k: int | None = max(hint + 1, 0 if blk is None else blk.k + 1)
            for _ in range(self.max_attempts):
                k = next_block(pool, k, self._bs(pool)) if k is not None else None
                if k is None:
                    self._cursor_done[pool.uid] = time.monotonic()
                    return False
                if await self.store.claim_block(pool.uid, k, self.owner, self.clock()):
                    await self.store.raise_hint(pool.name, "block_hint", k)
                    offsets = block_offsets(pool, k, self._bs(pool))
                    self._blocks[pool.uid] = _Block(
                        pool.uid, k, pool.first, deque(offsets), len(offsets)
                    )
                    return True
                k += 1
            raise TransientError(f"could not claim a block of pool {pool.name}")

    async def _leftover(self, pool: Pool, fresh: bool = False) -> _Candidate | None:
        """A never-used address of a claimed block that is not used up (its owner died)."""
        empty = None if fresh else self._leftover_empty.get(pool.uid)
        if empty is not None and time.monotonic() - empty < max(self.pool_cache_s, 0.2):
            return None
        mine = self._blocks.get(pool.uid)
        for k in await self.store.open_blocks(pool.uid):
            if mine is not None and mine.k == k:
                continue
            pending = False
            for o in block_offsets(pool, k, self._bs(pool)):
                ip = pool.first + o
                if (pool.uid, ip) in self._used:
                    continue
                if ip in self._inflight:
                    pending = True
                    continue
                addr = str(IPv4Address(ip))
                if await self.store.get_history(history_id(addr, pool.uid, 1)) is not None:
                    self._used.add((pool.uid, ip))
                    continue
                return _Candidate(ip, 0)
            if not pending:
                await self.store.mark_block_full(pool.uid, k)
        self._leftover_empty[pool.uid] = time.monotonic()
        return None

    def _queue(self, pool_uid: str) -> _FreeQueue:
        return self._queues.setdefault(pool_uid, _FreeQueue())

    async def _next_released(self, pool: Pool) -> _Candidate | None:
        """The least recently released cooled address, walking the free queue from its head."""
        q = self._queue(pool.uid)
        if q.head == 0 and not q.entries:
            doc = await self.store.get_pool(pool.name)
            q.head = q.persisted_head = max(q.head, 0 if doc is None else doc.get("free_head", 0))
        cutoff = self.clock() - pool.cooldown
        seq = q.head
        while True:
            entry = q.entries.get(seq)
            if entry is None:
                entry = await self.store.get_slot(slot_id(pool.uid, seq))
                if entry is None:
                    break  # the end of the queue
                q.entries[seq] = entry
            if seq not in q.consumed and entry["ip_int"] not in self._inflight:
                if entry["released_at"] > cutoff:
                    break  # later entries were released later still
                nxt = history_id(entry["ip"], pool.uid, entry["gen"] + 1)
                if await self.store.get_history(nxt) is not None:
                    q.consumed.add(seq)
                elif pool.allocatable(entry["ip_int"]):
                    await self._advance(pool, q)
                    return _Candidate(entry["ip_int"], entry["gen"], seq)
            seq += 1
        await self._advance(pool, q)
        return None

    async def _advance(self, pool: Pool, q: _FreeQueue) -> None:
        while q.head in q.consumed:
            q.consumed.discard(q.head)
            q.entries.pop(q.head, None)
            q.head += 1
        if q.head - q.persisted_head >= 16:
            q.persisted_head = q.head
            await self.store.raise_hint(pool.name, "free_head", q.head)

    async def _append(self, pool: Pool, ip: int, gen: int, released_at: datetime) -> None:
        """Append a released address to the pool's free queue."""
        q = self._queue(pool.uid)
        doc = await self.store.get_pool(pool.name)
        seq = max(q.tail, 0 if doc is None else doc.get("free_tail", 0))
        entry = {"pool_uid": pool.uid, "ip_int": ip, "ip": str(IPv4Address(ip)), "gen": gen,
                 "released_at": released_at}
        for _ in range(100_000):
            if await self.store.insert_slot({"_id": slot_id(pool.uid, seq), **entry}):
                break
            seq += 1
        q.tail = seq + 1
        await self.store.raise_hint(pool.name, "free_tail", q.tail)

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
            p = await self._pool_of_lease(lease)
            ip, gen = int(IPv4Address(lease["ip"])), lease["gen"] - 1
            released = EPOCH
            if gen > 0:
                prev = await self.store.get_history(history_id(lease["ip"], p.uid, gen))
                released = EPOCH if prev is None else prev.get("released_at") or EPOCH
            await self.store.delete_history(history_id(lease["ip"], p.uid, gen + 1))
            await self._append(p, ip, gen, released)
            await self.store.delete_lease(lease["_id"], lease["ip"])
            log.info("bulk allocation rolled back", machine_id=lease["_id"],
                     ip=lease["ip"], request_id=request_id)

    # -------------------------------------------------------------- release

    async def release(self, machine_id: str) -> dict | None:
        """Release the machine's IP into cooldown; return its record, None if it had none."""
        lease = await self.store.get_lease(machine_id)
        if lease is None:
            return None
        if lease.get("state") == "released":  # a redelivery: answer again
            return {"ip": lease["ip"], "pool": lease["pool"], "machine_id": machine_id,
                    "released_at": lease.get("released_at")}
        now = self.clock()
        pool = await self._pool_of_lease(lease)
        # Order matters: the history record first (a stale claim checks it), then the queue
        # entry, then the lease; a crash in between is finished by the redelivered release.
        record = {"ip": lease["ip"], "pool": lease["pool"], "pool_uid": lease["pool_uid"],
                  "gen": lease["gen"], "machine_id": machine_id, "released_at": now}
        # A claim's record keeps the allocation time it was stamped with; a never-used
        # address's first record is created here, with the lease's.
        await self.store.upsert_history(
            history_id(lease["ip"], lease["pool_uid"], lease["gen"]), record,
            on_insert={"allocated_at": lease["allocated_at"]},
        )
        record["allocated_at"] = lease["allocated_at"]
        await self._append(pool, int(IPv4Address(lease["ip"])), lease["gen"], now)
        await self.store.end_lease(machine_id, lease["ip"], now)
        return record

    # -------------------------------------------------------------- queries

    async def lookup(self, ip: IPv4Address, at: datetime | None = None) -> IpLookupResult:
        """Who holds ``ip`` now (and at ``at``), its state and its whole history."""
        ip_int, addr = int(ip), str(ip)
        pools = await self.store.pools_containing(ip_int)
        records: list[dict] = []
        for doc in pools:
            gen = 0
            while (h := await self.store.get_history(history_id(addr, doc["uid"], gen + 1))):
                records.append(h)
                gen += 1
        active = await self.store.lease_of_ip(addr)
        if active is not None and not any(
            r["pool_uid"] == active["pool_uid"] and r["gen"] == active["gen"] for r in records
        ):
            records.append({"machine_id": active["_id"], "allocated_at": active["allocated_at"],
                            "released_at": None, "pool": active["pool"], "gen": active["gen"]})
        events = list(history_of(records))
        then = owner_at(records, at) if at is not None else None
        current = [p for p in pools if p.get("state") == "active" and p["_id"] != p["uid"]]
        if not current:
            return IpLookupResult(ip, None, "unknown", None, then, None, events)
        pool = pool_of(current[0])
        if active is not None:
            return IpLookupResult(ip, pool.name, "active", active["_id"], then, None, events)
        if not pool.allocatable(ip_int):
            return IpLookupResult(ip, pool.name, "reserved", None, then, None, events)
        mine = [r for r in records if r.get("pool_uid") == pool.uid and r.get("released_at")]
        last = max((r["released_at"] for r in mine), default=None)
        if last is not None and last + pool.cooldown > self.clock():
            return IpLookupResult(ip, pool.name, "cooling", None, then, last + pool.cooldown,
                                  events)
        return IpLookupResult(ip, pool.name, "free", None, then, None, events)
