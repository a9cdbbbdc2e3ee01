"""Address sources: where the next address worth claiming comes from. Nothing here takes one.

An allocation never scans the pool. In order of preference it takes:

1. a never-used offset from this replica's current *block* (``block_size`` offsets claimed by
   inserting ``ip_blocks/<pool>:<k>``: one write per block, not per address);
2. a never-used offset left in a claimed block that is not used up (its replica was killed, or
   is slow): only when no block is left, bounded by the open blocks;
3. an address whose machine never ran, from the pool's *ready* lane
   (``ip_free/<pool>+ready:<seq>``): it has no past to cool down from (no ARP cache, no
   ``known_hosts`` entry), so it is free at once;
4. the least recently released address whose cooldown has passed, walking the pool's free
   queue (``ip_free/<pool>:<seq>``) from its head, by ``_id`` reads only. The walk stops at
   the first address still cooling (later ones were released later still), which is why the
   ready lane is a queue of its own rather than entries among these.

Whatever the source, an address is a hint: it is only *taken* by the claim protocol
(:mod:`.claims`). This replica remembers what it learnt (its block, the free queue it walked,
addresses known to be used, a recent "none left") so that the hot path reads little; every such
memory is a cache, and the pass that answers ``pool_exhausted`` ignores the "none left" ones.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address

from libs.common.errors import TransientError

from ..documents import FreeSlotDoc, HintField, HistoryDoc, PoolDoc
from ..domain import Pool, block_offsets, next_block
from ..store import IpamStore, history_id, slot_id

__all__ = [
    "COOLING",
    "EPOCH",
    "FROM_EXACT_REQUEST",
    "READY",
    "AddressSources",
    "Block",
    "Candidate",
    "FreeQueueView",
    "Lane",
    "lane_after",
    "latest_generation",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # "released" time of never-used addresses
FROM_EXACT_REQUEST = -1  # Candidate.queue_seq of an address the requester named


@dataclass
class Block:
    """Block ``index`` of a pool's never-used offsets, claimed by this replica."""

    pool_uid: str
    index: int
    first: int  # the pool's network address: queued items are offsets from it
    offsets: deque[int]  # not handed to a claim yet
    unresolved: int  # offsets not yet tried to the end (queued or in flight)


@dataclass(frozen=True)
class Lane:
    """One of a pool's free queues, with the pool-document hints that find its head and tail."""

    suffix: str  # after the pool uid in its entries' _id; the cooling lane's is empty
    head: HintField
    tail: HintField
    cools: bool  # entries rest the pool's cooldown before they are handed out

    def key(self, pool_uid: str) -> str:
        """What names this lane of the pool (its entries are ``slot_id(key, seq)``)."""
        return f"{pool_uid}{self.suffix}"


# Addresses of machines that ran: they cool down. Its entries keep the original _ids.
COOLING = Lane("", "free_head", "free_tail", cools=True)
# Addresses with nothing to cool down from (their machine never ran): free at once.
READY = Lane("+ready", "ready_head", "ready_tail", cools=False)


@dataclass
class FreeQueueView:
    """This replica's view of a pool's free queue: entries are immutable, so they are cached."""

    head: int = 0  # every entry below is consumed
    tail: int = 0  # next sequence number to append at (a lower bound)
    persisted_head: int = 0
    entries: dict[int, FreeSlotDoc] = field(default_factory=dict)
    consumed: set[int] = field(default_factory=set)
    loaded: bool = False  # the persisted head was read


@dataclass(frozen=True)
class Candidate:
    """An address worth trying, and where it came from."""

    ip: int
    last_gen: int  # the address's last generation; the claim takes last_gen + 1
    # The free-queue entry of a released address, FROM_EXACT_REQUEST for a named one, None for
    # a never-used address (of a block, or a leftover).
    queue_seq: int | None = None
    block: Block | None = None
    lane: Lane = COOLING  # the free queue of ``queue_seq``

    @property
    def claim_kind(self) -> str:
        """How the claim is checked: "probe" for a never-used address, else "history"."""
        # A never-used address has no history to insert into: its claim is checked by reading
        # gen 1 after the lease insert. A re-used (or named) one inserts its next generation.
        return "probe" if self.queue_seq is None and self.last_gen == 0 else "history"

    @property
    def queue_entry(self) -> int | None:
        """The free-queue sequence number this candidate consumes, if any."""
        return self.queue_seq if self.queue_seq is not None and self.queue_seq >= 0 else None


def lane_after(last: HistoryDoc | None) -> Lane:
    """Where an address goes back to after its last record ``last`` (None: never used): the
    ready lane unless a machine ran on it (a record from before the flag counts as ran)."""
    ran = last is not None and last.get("ever_ran", True) and last.get("released_at")
    return COOLING if ran else READY


async def latest_generation(store: IpamStore, pool: Pool, ip: int) -> tuple[int, HistoryDoc | None]:
    """The address's last recorded gen and record, by ``_id`` probes (gens are few)."""
    addr, gen, last = str(IPv4Address(ip)), 0, None
    while doc := await store.get_history(history_id(addr, pool.uid, gen + 1)):
        gen, last = gen + 1, doc
    return gen, last


@dataclass
class AddressSources:
    """This replica's address sources over every pool, with what it remembers of them."""

    store: IpamStore
    owner: str  # written on the blocks this replica claims
    clock: Callable[[], datetime]
    block_size: int = 128
    pool_cache_s: float = 1.0
    max_attempts: int = 256
    # Addresses some claim of this process is trying now (claims.py adds and removes them).
    in_flight: set[int] = field(default_factory=set)
    _blocks: dict[str, Block] = field(default_factory=dict)
    _block_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _no_block_left_at: dict[str, float] = field(default_factory=dict)
    _no_leftover_at: dict[str, float] = field(default_factory=dict)
    _no_ready_at: dict[str, float] = field(default_factory=dict)  # the ready lane was empty
    _known_used: set[tuple[str, int]] = field(default_factory=set)  # (pool uid, address)
    _free_queues: dict[str, FreeQueueView] = field(default_factory=dict)

    def block_size_of(self, pool: Pool) -> int:
        """Block size for ``pool``: large blocks save writes; a small pool gets small blocks
        so that every replica can hold one."""
        return min(self.block_size, max(8, pool.size // 16))

    def forget_no_block_left(self, pool_uid: str) -> None:
        """Look for blocks again (the pool's reserved addresses changed)."""
        self._no_block_left_at.pop(pool_uid, None)

    def forget_pool(self, pool_uid: str) -> None:
        """Drop this replica's block and free-queue view of a deleted pool."""
        self._blocks.pop(pool_uid, None)
        for lane in (COOLING, READY):
            self._free_queues.pop(lane.key(pool_uid), None)

    def free_queue(self, pool_uid: str, lane: Lane = COOLING) -> FreeQueueView:
        """This replica's view of one of the pool's free queues."""
        return self._free_queues.setdefault(lane.key(pool_uid), FreeQueueView())

    def mark_used(self, pool_uid: str, ip: int) -> None:
        """Remember that ``ip`` is held (or was handed out): no leftover to try."""
        self._known_used.add((pool_uid, ip))

    def mark_consumed(self, pool_uid: str, cand: Candidate) -> None:
        """The candidate's free-queue entry is used (its next gen is claimed)."""
        if cand.queue_entry is not None:
            self.free_queue(pool_uid, cand.lane).consumed.add(cand.queue_entry)

    def give_back(self, cand: Candidate) -> None:
        """Put a block's address back in front, for the next claim of this replica."""
        if cand.block is not None:
            cand.block.offsets.appendleft(cand.ip - cand.block.first)

    async def mark_tried(self, cand: Candidate) -> None:
        """A claim of ``cand`` ended (either way); a block all tried is recorded as full."""
        block = cand.block
        if block is None:
            return
        block.unresolved -= 1
        if block.unresolved <= 0 and not block.offsets:
            await self.store.mark_block_full(block.pool_uid, block.index)

    async def next_candidate(self, pool: Pool, fresh: bool = False) -> Candidate | None:
        """The next address worth trying, never-used first; None when the pool is full.

        ``fresh`` looks again where a recent pass found nothing (no block left to claim, no
        leftover), which is what answering ``pool_exhausted`` needs."""
        for _ in range(self.max_attempts):
            block = self._blocks.get(pool.uid)
            while block is not None and block.offsets:
                ip = pool.first + block.offsets.popleft()
                if not pool.allocatable(ip):
                    await self.mark_tried(Candidate(ip, 0, None, block))
                    continue
                return Candidate(ip, 0, None, block)
            if not await self._claim_next_block(pool, fresh):
                break
        leftover = await self._leftover(pool, fresh)
        if leftover is not None:
            return leftover
        return await self._next_ready(pool, fresh) or await self._next_released(pool)

    async def _next_ready(self, pool: Pool, fresh: bool = False) -> Candidate | None:
        """An address of the ready lane; a lane found empty is not read again for a moment
        (releases there are rare: failed creates), except by a ``fresh`` pass."""
        none_at = None if fresh else self._no_ready_at.get(pool.uid)
        if none_at is not None and time.monotonic() - none_at < max(self.pool_cache_s, 0.2):
            return None
        cand = await self._next_released(pool, READY)
        if cand is None:
            self._no_ready_at[pool.uid] = time.monotonic()
        return cand

    async def _claim_next_block(self, pool: Pool, fresh: bool = False) -> bool:
        """Claim the next block of never-used offsets; False when none is left."""
        lock = self._block_locks.setdefault(pool.uid, asyncio.Lock())
        async with lock:
            block = self._blocks.get(pool.uid)
            if block is not None and block.offsets:
                return True  # another task of this process claimed one meanwhile
            none_left_at = None if fresh else self._no_block_left_at.get(pool.uid)
            if none_left_at is not None and (
                time.monotonic() - none_left_at < 5 * max(self.pool_cache_s, 0.2)
            ):
                return False
            doc = await self.store.get_pool(pool.name)
            hint = -1 if doc is None else doc.get("block_hint", -1)
            k: int | None = max(hint + 1, 0 if block is None else block.index + 1)
            size = self.block_size_of(pool)
            for _ in range(self.max_attempts):
                k = next_block(pool, k, size) if k is not None else None
                if k is None:
                    self._no_block_left_at[pool.uid] = time.monotonic()
                    return False
                if await self.store.claim_block(pool.uid, k, self.owner, self.clock()):
                    await self.store.raise_hint(pool.name, "block_hint", k)
                    offsets = block_offsets(pool, k, size)
                    self._blocks[pool.uid] = Block(
                        pool.uid, k, pool.first, deque(offsets), len(offsets)
                    )
                    return True
                k += 1
            raise TransientError(f"could not claim a block of pool {pool.name}")

    async def _leftover(self, pool: Pool, fresh: bool = False) -> Candidate | None:
        """A never-used address of a claimed block that is not used up (its owner died)."""
        none_at = None if fresh else self._no_leftover_at.get(pool.uid)
        if none_at is not None and time.monotonic() - none_at < max(self.pool_cache_s, 0.2):
            return None
        mine = self._blocks.get(pool.uid)
        for k in await self.store.open_blocks(pool.uid):
            if mine is not None and mine.index == k:
                continue
            pending = False
            for offset in block_offsets(pool, k, self.block_size_of(pool)):
                ip = pool.first + offset
                if (pool.uid, ip) in self._known_used:
                    continue
                if ip in self.in_flight:
                    pending = True
                    continue
                addr = str(IPv4Address(ip))
                if await self.store.get_history(history_id(addr, pool.uid, 1)) is not None:
                    self._known_used.add((pool.uid, ip))
                    continue
                return Candidate(ip, 0)
            if not pending:
                await self.store.mark_block_full(pool.uid, k)
        self._no_leftover_at[pool.uid] = time.monotonic()
        return None

    async def _next_released(self, pool: Pool, lane: Lane = COOLING) -> Candidate | None:
        """The least recently released address free to hand out (cooled, in the cooling lane),
        walking the lane from its head."""
        queue = self.free_queue(pool.uid, lane)
        if not queue.loaded:
            doc = await self.store.get_pool(pool.name)
            queue.head = queue.persisted_head = max(
                queue.head, 0 if doc is None else doc.get(lane.head, 0)
            )
            queue.loaded = True
        cutoff = self.clock() - pool.cooldown
        seq = queue.head
        while True:
            entry = queue.entries.get(seq)
            if entry is None:
                entry = await self.store.get_slot(slot_id(lane.key(pool.uid), seq))
                if entry is None:
                    break  # the end of the queue
                queue.entries[seq] = entry
            if seq not in queue.consumed and entry["ip_int"] not in self.in_flight:
                if lane.cools and entry["released_at"] > cutoff:
                    break  # later entries were released later still
                next_gen = history_id(entry["ip"], pool.uid, entry["gen"] + 1)
                if await self.store.get_history(next_gen) is not None:
                    queue.consumed.add(seq)
                elif pool.allocatable(entry["ip_int"]):
                    await self._advance_head(pool, queue, lane)
                    return Candidate(entry["ip_int"], entry["gen"], seq, lane=lane)
            seq += 1
        await self._advance_head(pool, queue, lane)
        return None

    async def _advance_head(self, pool: Pool, queue: FreeQueueView, lane: Lane) -> None:
        """Move the head past consumed entries; persist it now and then (a hint)."""
        while queue.head in queue.consumed:
            queue.consumed.discard(queue.head)
            queue.entries.pop(queue.head, None)
            queue.head += 1
        if queue.head - queue.persisted_head >= 16:
            queue.persisted_head = queue.head
            await self.store.raise_hint(pool.name, lane.head, queue.head)

    async def append_released(
        self, pool: Pool, ip: int, gen: int, released_at: datetime, lane: Lane = COOLING
    ) -> None:
        """Append a released address to one of the pool's free queues."""
        queue = self.free_queue(pool.uid, lane)
        doc = await self.store.get_pool(pool.name)
        seq = max(queue.tail, 0 if doc is None else doc.get(lane.tail, 0))
        addr = str(IPv4Address(ip))
        for _ in range(100_000):
            entry: FreeSlotDoc = {
                "_id": slot_id(lane.key(pool.uid), seq),
                "pool_uid": pool.uid,
                "ip_int": ip,
                "ip": addr,
                "gen": gen,
                "released_at": released_at,
            }
            if await self.store.insert_slot(entry):
                break
            seq += 1
        queue.tail = seq + 1
        if not lane.cools:
            self._no_ready_at.pop(pool.uid, None)  # this replica knows the lane is not empty
        await self.store.raise_hint(pool.name, lane.tail, queue.tail)

    async def requeue_unreserved(self, pool: Pool, doc: PoolDoc, lo: int, hi: int) -> None:
        """Queue un-reserved addresses of already claimed blocks (later blocks find them)."""
        claimed_end = pool.first + (doc.get("block_hint", -1) + 1) * self.block_size_of(pool) - 1
        for ip in range(lo, min(hi, claimed_end) + 1):
            if not pool.allocatable(ip):
                continue
            gen, last = await latest_generation(self.store, pool, ip)
            active = await self.store.lease_of_ip(str(IPv4Address(ip)))
            if active is None:
                released = EPOCH if last is None else last.get("released_at") or EPOCH
                await self.append_released(pool, ip, gen, released, lane_after(last))
