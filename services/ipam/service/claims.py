"""The claim protocol: how an address is taken, checked, given back and released.

An address is only *taken* by inserting the machine's lease, whose unique keys (the machine as
``_id``, the active IP) arbitrate between replicas; the address sources (:mod:`.allocator`) are
hints. A released address is re-taken by also inserting its next ``ip_history`` generation, so
a slow replica holding a stale candidate can never hand out an address still cooling down; a
never-used address is checked the same way right after its insert (a "probe" of gen 1). Every
step is idempotent by machine_id, and a crash between two writes leaves state that a retry or
the walk repairs.

The race fixes of issue 3 live here, and each has a unit test that fails without it:

1. a claim that lost gives its address back to its block only once it has left ``in_flight``
   (else a task popping it meanwhile took it for another's and dropped it: a stranded address);
2. a conflicting insert whose holder has vanished is retried once before the address is taken
   for used; ``pool_exhausted`` is answered only after a pass that trusts no cached "none left";
3. a claim that finds its own machine's record (a release answered through a duplicate
   delivery) held; it was not stale;
4. a young stale claim is left to its claimer (FerretDB v1 deletes by ``_id`` after matching,
   so a second deleter can remove the machine's next lease); another delivery cleans up only
   an abandoned one;
5. a re-used address's history record is stamped after its lease insert succeeded, so "who had
   this IP at t" never finds two machines;
6. an abandoned claim is deleted by one delivery alone: every delivery of the machine waits
   until it is abandoned, then several deleted it, and the later delete removed the lease the
   earlier one had just inserted next (the machine answered two addresses, one stranded). The
   deleter of any stale claim, its claimer's or an abandoned one, is elected by inserting a
   ``lease_cleanups`` marker, and deletes by the claim's ``claim_id``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import IPv4Address

import structlog

from libs.common.errors import TransientError

from ..documents import LeaseDoc, ReleasedIp
from ..domain import AllocationError, Pool
from ..store import IpamStore, LeaseConflict, cleanup_id, history_id
from .allocator import (
    COOLING,
    EPOCH,
    FROM_EXACT_REQUEST,
    READY,
    AddressSources,
    Candidate,
    lane_after,
    latest_generation,
)
from .pools import PoolCatalog

__all__ = ["Allocation", "Claims", "lease_document"]

log = structlog.get_logger("ipam")


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
    def of(cls, lease: LeaseDoc) -> Allocation:
        """Build from a lease record."""
        return cls(
            lease["_id"],
            IPv4Address(lease["ip"]),
            lease["prefix_len"],
            IPv4Address(lease["gateway"]),
            lease["vlan_id"],
            lease["pool"],
            lease["dc"],
        )


def _refuse_released(lease: LeaseDoc) -> None:
    """A machine's IP is for life: a released machine gets no new one (a late duplicate)."""
    if lease.get("state") == "released":
        raise AllocationError(
            "machine_released", f"{lease['_id']} released {lease['ip']}; its IP is not renewed"
        )


def lease_document(
    pool: Pool, machine_id: str, cand: Candidate, request_id: str | None, allocated_at: datetime
) -> LeaseDoc:
    """The lease that claims ``cand`` for the machine."""
    ip = str(IPv4Address(cand.ip))
    return {
        "claim": cand.claim_kind,
        "claim_id": uuid.uuid4().hex,
        "_id": machine_id,
        "active_ip": ip,
        "ip": ip,
        "gen": cand.last_gen + 1,
        "pool": pool.name,
        "pool_uid": pool.uid,
        "dc": pool.dc,
        "vlan_id": pool.vlan_id,
        "prefix_len": pool.network.prefixlen,
        "gateway": str(pool.gateway),
        "allocated_at": allocated_at,
        "request_id": request_id,
        "state": "active",
    }


def _age_s(at: datetime, now: datetime) -> float:
    """Seconds from ``at`` (naive means UTC, as a store may return it) to ``now``."""
    return (now - (at if at.tzinfo else at.replace(tzinfo=UTC))).total_seconds()


@dataclass
class Claims:
    """Allocate (one or many) and release, by the claim protocol; one instance per process."""

    store: IpamStore
    pools: PoolCatalog
    sources: AddressSources
    clock: Callable[[], datetime]
    max_attempts: int = 256
    # A stale claim is undone by its own claimer; another delivery undoes it only once it is
    # this old (its claimer died): see _other_delivery_holds. An elected deleter that has not
    # deleted it after as long died too: see _elected_to_delete.
    abandoned_claim_s: float = 15.0

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
            named_pool = await self.pools.active(pool, dc, vlan_id)
            return await self._allocate_named(named_pool, machine_id, int(ip), request_id)
        # No read first: the lease insert itself finds a machine that already has one
        # (its _id is the machine), which keeps the common path at one write.
        p = await self.pools.active(pool, dc, vlan_id)
        waits = 0
        for _ in range(self.max_attempts):
            cand = await self.sources.next_candidate(p)
            if cand is None:
                other = await self.store.get_lease(machine_id)
                if other is not None:  # a concurrent delivery for the same machine
                    _refuse_released(other)
                    if await self._other_delivery_holds(other):
                        return Allocation.of(other)
                if (self.sources.in_flight or other is not None) and waits < 100:
                    # Claims in flight here may still fail and free their address.
                    waits += 1
                    await asyncio.sleep(0.01)
                    continue
                # pool_exhausted only after a pass that trusts no cached "none left".
                cand = await self.sources.next_candidate(p, fresh=True)
                if cand is None:
                    raise AllocationError("pool_exhausted", f"pool {p.name} has no free address")
            got = await self._claim(p, machine_id, cand, request_id)
            if got is not None:
                return got
        raise TransientError(
            f"no address claimed in pool {p.name} after {self.max_attempts} contended attempts"
        )

    async def _allocate_named(
        self, pool: Pool, machine_id: str, ip: int, request_id: str | None
    ) -> Allocation:
        """Claim the address the requester named, or say clearly why not."""
        addr = IPv4Address(ip)
        reason = pool.why_not_allocatable(ip)
        if reason is not None:
            raise AllocationError(reason, f"{addr} cannot be allocated in pool {pool.name}")
        holder = await self.store.lease_of_ip(str(addr))
        if holder is not None:
            raise AllocationError("ip_taken", f"{addr} is held by {holder['_id']}")
        gen, last = await latest_generation(self.store, pool, ip)
        released = None if last is None or lane_after(last) is READY else last["released_at"]
        if released is not None and released > self.clock() - pool.cooldown:
            until = released + pool.cooldown
            raise AllocationError("ip_cooling", f"{addr} cools down until {until.isoformat()}")
        cand = Candidate(ip, gen, queue_seq=FROM_EXACT_REQUEST)
        got = await self._claim(pool, machine_id, cand, request_id)
        if got is None:
            raise AllocationError("ip_taken", f"{addr} was taken concurrently")
        return got

    async def _claim(
        self, pool: Pool, machine_id: str, cand: Candidate, request_id: str | None
    ) -> Allocation | None:
        """Take ``cand`` for the machine; None if another claimer has (or had) the address."""
        lease = lease_document(pool, machine_id, cand, request_id, self.clock())
        # An address goes back to its block only once it has left in_flight: while it is in
        # flight, a task popping it from the block would take it for another task's and drop it.
        give_back = True
        self.sources.in_flight.add(cand.ip)
        try:
            for attempt in range(2):
                try:
                    await self.store.insert_lease(lease)
                    break
                except LeaseConflict:
                    other = await self.store.get_lease(machine_id)
                    if other is not None:  # a concurrent delivery for the same machine
                        _refuse_released(other)
                        if await self._other_delivery_holds(other):
                            return Allocation.of(other)
                        return None  # a stale claim, undone by its claimer: try again
                    if attempt == 0:
                        continue  # the holder may have just gone (a stale claim undone)
                    give_back = False
                    self.sources.mark_used(pool.uid, cand.ip)  # active elsewhere
                    await self.sources.mark_tried(cand)
                    return None
            give_back = False
            if await self._generation_was_taken(pool, lease):
                await self._delete_stale_claim(lease)
                self.sources.mark_used(pool.uid, cand.ip)
                self.sources.mark_consumed(pool.uid, cand)
                await self.sources.mark_tried(cand)
                return None
            await self.sources.mark_tried(cand)
            self.sources.mark_consumed(pool.uid, cand)
            return Allocation.of(lease)
        finally:
            self.sources.in_flight.discard(cand.ip)
            if give_back:
                self.sources.give_back(cand)

    async def _generation_was_taken(self, pool: Pool, lease: LeaseDoc) -> bool:
        """After the insert: whether this generation was handed out before (a stale candidate).

        The lease holds the IP now; the history record of a release is written before its lease
        goes, so a stale claim always sees it here."""
        machine_id = lease["_id"]
        hid = history_id(lease["ip"], pool.uid, lease["gen"])
        if lease.get("claim") == "probe":
            # A record of this very machine is its own release, answered meanwhile through
            # a duplicate delivery that confirmed this lease: the claim held.
            record = await self.store.get_history(hid)
            return record is not None and record.get("machine_id") != machine_id
        try:
            # Stamped now, after the lease insert succeeded, hence after the previous
            # holder's release (stamped before its lease ended): "who had this IP at t"
            # never finds two machines. The lease's own stamp predates the insert.
            await self.store.insert_history(
                {
                    "_id": hid,
                    "ip": lease["ip"],
                    "pool": pool.name,
                    "pool_uid": pool.uid,
                    "gen": lease["gen"],
                    "machine_id": machine_id,
                    "allocated_at": self.clock(),
                    "released_at": None,
                }
            )
            return False
        except LeaseConflict:
            # A duplicate delivery may have finished this very claim for us.
            record = await self.store.get_history(hid)
            return record is None or record.get("machine_id") != machine_id

    async def _other_delivery_holds(self, lease: LeaseDoc) -> bool:
        """Settle another delivery's lease of this machine: True if it holds, False if it is a
        stale claim (the caller tries again).

        A young stale claim is left to its claimer; only one older than ``abandoned_claim_s``
        (its claimer died mid-claim) is deleted here, by the one delivery elected to (see
        :meth:`_delete_stale_claim`)."""
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
                    await self.store.insert_history(
                        {
                            "_id": hid,
                            "ip": ip,
                            "pool": lease["pool"],
                            "pool_uid": lease["pool_uid"],
                            "gen": lease["gen"],
                            "machine_id": machine,
                            "allocated_at": self.clock(),
                            "released_at": None,
                        }
                    )
                except LeaseConflict:
                    record = await self.store.get_history(hid)
                    holds = record is not None and record.get("machine_id") == machine
                else:
                    holds = True
            else:
                holds = record.get("machine_id") == machine
        if holds:
            return True
        abandoned = _age_s(lease["allocated_at"], self.clock()) >= self.abandoned_claim_s
        if not (abandoned and await self._delete_stale_claim(lease)):
            await asyncio.sleep(0.02)  # its claimer, or the elected delivery, is undoing it
        return False

    async def _delete_stale_claim(self, lease: LeaseDoc) -> bool:
        """Delete a stale claim's lease if this delivery is elected to; False if it is not.

        FerretDB v1 deletes by ``_id`` after matching the filter, so of two deleters of one
        claim the later could remove the machine's next lease (or its release tombstone),
        inserted in between: an address held by nobody, or a lease nobody releases. So one
        deleter is elected per claim, and its delete names the claim's ``claim_id``: a later
        lease of the machine, even of the same address, is another claim and never matches."""
        if not await self._elected_to_delete(lease):
            return False
        await self.store.delete_lease(lease["_id"], lease["ip"], lease.get("claim_id"))
        return True

    async def _elected_to_delete(self, lease: LeaseDoc) -> bool:
        """Whether this delivery inserted the claim's cleanup marker (the unique-index vote)."""
        machine = lease["_id"]
        # A lease from before claim ids is told apart by its address and generation.
        claim = lease.get("claim_id") or f"{lease['ip']}@{lease['gen']}"
        rnd = 0
        while not await self.store.claim_cleanup(
            {"_id": cleanup_id(machine, claim, rnd), "machine_id": machine, "at": self.clock()}
        ):
            winner = await self.store.get_cleanup(cleanup_id(machine, claim, rnd))
            if winner is None or _age_s(winner["at"], self.clock()) < self.abandoned_claim_s:
                return False  # the winner is deleting it
            rnd += 1  # that winner died before deleting it: elect another delivery
        return True

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
        await self.pools.active(pool, dc, vlan_id)
        done = []
        try:
            for machine_id in machine_ids:
                done.append(
                    await self.allocate(
                        machine_id, pool=pool, dc=dc, vlan_id=vlan_id, request_id=request_id
                    )
                )
        except AllocationError:
            await self._roll_back(request_id)
            raise
        return done

    async def _roll_back(self, request_id: str) -> None:
        """Undo the (never announced) leases of a failed bulk request, without cooldown."""
        for lease in await self.store.leases_of_request(request_id):
            pool = await self.pools.of_lease(lease)
            ip, gen = int(IPv4Address(lease["ip"])), lease["gen"] - 1
            prev = None
            if gen > 0:
                prev = await self.store.get_history(history_id(lease["ip"], pool.uid, gen))
            released = EPOCH if prev is None else prev.get("released_at") or EPOCH
            await self.store.delete_history(history_id(lease["ip"], pool.uid, gen + 1))
            # Back to where it came from: cooling after a machine that ran, else ready.
            await self.sources.append_released(pool, ip, gen, released, lane_after(prev))
            await self.store.delete_lease(lease["_id"], lease["ip"], lease.get("claim_id"))
            log.info(
                "bulk allocation rolled back",
                machine_id=lease["_id"],
                ip=lease["ip"],
                request_id=request_id,
            )

    async def release(self, machine_id: str, ever_ran: bool = True) -> ReleasedIp | None:
        """Release the machine's IP into cooldown (free at once if the machine never ran);
        return its record, None if it had none."""
        lease = await self.store.get_lease(machine_id)
        if lease is None:
            return None
        if lease.get("state") == "released":  # a redelivery: answer again
            return {
                "ip": lease["ip"],
                "pool": lease["pool"],
                "machine_id": machine_id,
                "released_at": lease.get("released_at"),
            }
        now = self.clock()
        pool = await self.pools.of_lease(lease)
        # Order matters: the history record first (a stale claim checks it), then the queue
        # entry, then the lease; a crash in between is finished by the redelivered release.
        record: ReleasedIp = {
            "ip": lease["ip"],
            "pool": lease["pool"],
            "pool_uid": lease["pool_uid"],
            "gen": lease["gen"],
            "machine_id": machine_id,
            "released_at": now,
            "ever_ran": ever_ran,
        }
        # A claim's record keeps the allocation time it was stamped with; a never-used
        # address's first record is created here, with the lease's.
        await self.store.upsert_history(
            history_id(lease["ip"], lease["pool_uid"], lease["gen"]),
            {**record},
            on_insert={"allocated_at": lease["allocated_at"]},
        )
        record["allocated_at"] = lease["allocated_at"]
        ip, lane = int(IPv4Address(lease["ip"])), COOLING if ever_ran else READY
        await self.sources.append_released(pool, ip, lease["gen"], now, lane)
        await self.store.end_lease(machine_id, lease["ip"], now)
        return record
