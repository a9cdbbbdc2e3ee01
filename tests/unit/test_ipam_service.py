"""ipam's use cases on the in-memory store: idempotence, order, cooldown, bulk, pool rules."""

from __future__ import annotations

import asyncio
import inspect
import random
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address

import pytest

from libs.common.errors import TransientError
from services.ipam.domain import AllocationError, PoolRejectedError
from services.ipam.fakes import MemoryIpamStore
from services.ipam.service import Ipam
from services.ipam.store import LEASES, cleanup_id, history_id


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 24, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryIpamStore:
    return MemoryIpamStore()


@pytest.fixture
async def ipam(store, clock) -> Ipam:
    ipam = Ipam(store, block_size=8, pool_cache_s=0, clock=clock)
    # /27: 30 usable, gateway .1 and .10-.12 reserved: 26 allocatable.
    await ipam.create_pool(
        "p",
        "dc1",
        100,
        "10.100.0.0/27",
        IPv4Address("10.100.0.1"),
        ["10.100.0.10-10.100.0.12"],
        3600,
    )
    return ipam


async def _fill(ipam: Ipam, n: int, prefix: str = "m") -> list[str]:
    return [str((await ipam.allocate(f"{prefix}{i}", pool="p")).ip) for i in range(n)]


async def test_allocation_carries_the_network_settings(ipam):
    a = await ipam.allocate("m1", dc="dc1", vlan_id=100)
    assert (str(a.ip), a.prefix_len, str(a.gateway), a.vlan_id, a.pool, a.dc) == (
        "10.100.0.2",
        27,
        "10.100.0.1",
        100,
        "p",
        "dc1",
    )


async def test_same_machine_gets_same_ip_even_concurrently(ipam, store):
    got = await asyncio.gather(*[ipam.allocate("m1", pool="p") for _ in range(5)])
    again = await ipam.allocate("m1", pool="p")
    assert {a.ip for a in got} == {again.ip}
    assert len(await store.leases_of_pool((await store.get_pool("p"))["uid"])) == 1


async def test_replicas_on_one_store_never_share_an_ip(store, ipam, clock):
    other = Ipam(store, block_size=8, pool_cache_s=0, clock=clock)
    got = await asyncio.gather(
        *[(ipam, other)[i % 2].allocate(f"m{i}", pool="p") for i in range(26)]
    )
    assert len({a.ip for a in got}) == 26


async def test_full_pool_answers_pool_exhausted(ipam):
    await _fill(ipam, 26)
    with pytest.raises(AllocationError) as exc:
        await ipam.allocate("one-too-many", pool="p")
    assert exc.value.reason == "pool_exhausted"


async def test_never_used_first_then_least_recently_released_after_cooldown(ipam, clock):
    ips = await _fill(ipam, 24)
    for mid in ("m5", "m2", "m9"):
        await ipam.release(mid)
        clock.advance(60)
    fresh = await _fill(ipam, 2, prefix="new")
    with pytest.raises(AllocationError) as cooling:
        await ipam.allocate("early", pool="p")
    clock.advance(3600)
    reused = await _fill(ipam, 3, prefix="late")
    assert cooling.value.reason == "pool_exhausted"
    assert not set(fresh) & set(ips)
    assert reused == [ips[5], ips[2], ips[9]]


async def test_a_changed_cooldown_applies_to_addresses_already_cooling(ipam, clock):
    ips = await _fill(ipam, 26)
    await ipam.release("m3")
    await ipam.update_pool("p", None, 0)
    assert str((await ipam.allocate("x", pool="p")).ip) == ips[3]


@pytest.mark.parametrize(
    ("ip", "reason"),
    [
        ("10.100.0.1", "ip_reserved"),
        ("10.100.0.11", "ip_reserved"),
        ("10.100.0.31", "ip_reserved"),
        ("10.100.1.5", "ip_outside_pool"),
        ("10.100.0.2", "ip_taken"),
        ("10.100.0.3", "ip_cooling"),
    ],
)
async def test_exact_ip_fails_clearly(ipam, ip, reason):
    await _fill(ipam, 2)
    await ipam.release("m1")
    with pytest.raises(AllocationError) as exc:
        await ipam.allocate("kvm", pool="p", ip=IPv4Address(ip))
    assert exc.value.reason == reason


async def test_exact_ip_is_reserved_and_then_skipped_by_the_cursor(ipam):
    kvm = await ipam.allocate("kvm", pool="p", ip=IPv4Address("10.100.0.4"))
    others = await _fill(ipam, 25)
    assert str(kvm.ip) == "10.100.0.4"
    assert "10.100.0.4" not in others


async def test_exact_ip_after_cooldown_is_allowed(ipam, clock):
    await _fill(ipam, 2)
    await ipam.release("m1")
    clock.advance(3601)
    a = await ipam.allocate("kvm", pool="p", ip=IPv4Address("10.100.0.3"))
    b = await ipam.allocate("next", pool="p")
    assert (str(a.ip), str(b.ip)) == ("10.100.0.3", "10.100.0.4")


async def test_unknown_pool(ipam):
    with pytest.raises(AllocationError) as exc:
        await ipam.allocate("m", dc="dc1", vlan_id=5000)
    assert exc.value.reason == "unknown_pool"


async def test_release_of_a_machine_without_lease_is_a_noop(ipam):
    assert await ipam.release("ghost") is None


async def test_release_twice_keeps_one_history_entry(ipam, store):
    a = await ipam.allocate("m", pool="p")
    await ipam.release("m")
    await ipam.release("m")
    r = await ipam.lookup(a.ip)
    assert [(e.machine_id, e.action) for e in r.history] == [("m", "allocated"), ("m", "released")]
    assert r.state == "cooling"


async def test_lookup_states_and_owner(ipam, clock):
    await _fill(ipam, 1)
    at = clock.now
    clock.advance(10)
    await ipam.release("m0")
    clock.advance(3600)
    await ipam.allocate("kvm", pool="p", ip=IPv4Address("10.100.0.2"))
    r = await ipam.lookup(IPv4Address("10.100.0.2"), at=at)
    states = [
        (await ipam.lookup(IPv4Address(ip))).state
        for ip in ("10.100.0.3", "10.100.0.10", "192.168.1.1")
    ]
    assert (r.state, r.owner, r.owner_at) == ("active", "kvm", "m0")
    assert states == ["free", "reserved", "unknown"]


async def test_bulk_is_all_or_nothing_and_rollback_skips_cooldown(ipam):
    await _fill(ipam, 20)
    with pytest.raises(AllocationError) as exc:
        await ipam.allocate_many("r1", [f"s{i}" for i in range(7)], pool="p")
    got = await ipam.allocate_many("r2", [f"s{i}" for i in range(6)], pool="p")
    usage = (await ipam.list_pools())[0]
    assert exc.value.reason == "pool_exhausted"
    assert len({a.ip for a in got}) == 6
    assert (usage.allocated, usage.cooling, usage.free) == (26, 0, 0)


async def test_bulk_is_idempotent(ipam):
    first = await ipam.allocate_many("r1", ["a", "b", "c"], pool="p")
    again = await ipam.allocate_many("r1", ["a", "b", "c"], pool="p")
    assert first == again


async def test_leftovers_of_a_dead_replica_are_used(store, ipam, clock):
    dead = Ipam(store, block_size=8, pool_cache_s=0, clock=clock)
    await dead.allocate("d", pool="p")  # claims a block of 8, uses one, then "dies"
    got = await _fill(ipam, 25)
    assert len(set(got)) == 25


async def test_usage(ipam, clock):
    await _fill(ipam, 5)
    await ipam.release("m0")
    v = (await ipam.list_pools())[0]
    assert (v.total, v.allocated, v.cooling, v.reserved, v.free) == (30, 4, 1, 4, 21)


@pytest.mark.parametrize(
    ("name", "dc", "vlan", "cidr", "gateway", "reason"),
    [
        ("p", "dc1", 200, "10.200.0.0/24", "10.200.0.1", "exists"),
        ("q", "dc1", 100, "10.200.0.0/24", "10.200.0.1", "vlan_taken"),
        ("q", "dc1", 200, "10.100.0.16/28", "10.100.0.17", "overlap"),
        ("q", "dc2", 100, "10.0.0.0/8", "10.0.0.1", "overlap"),
        ("q", "dc2", 100, "10.99.0.0/8", "10.99.0.1", "invalid"),
        ("q", "dc2", 100, "10.99.0.0/24", "10.98.0.1", "invalid"),
    ],
)
async def test_pool_create_rejections_change_nothing(
    ipam, store, name, dc, vlan, cidr, gateway, reason
):
    before = await store.list_pools()
    with pytest.raises(PoolRejectedError) as exc:
        await ipam.create_pool(name, dc, vlan, cidr, IPv4Address(gateway), [], 0)
    assert exc.value.reason == reason
    assert await store.list_pools() == before


async def test_same_vlan_in_another_dc_is_fine(ipam):
    await ipam.create_pool("q", "dc2", 100, "10.101.0.0/24", IPv4Address("10.101.0.1"), [], 0)
    assert [v.pool.name for v in await ipam.list_pools("dc2")] == ["q"]


async def test_redelivered_create_is_idempotent(ipam):
    args = ("q", "dc1", 101, "10.101.0.0/24", IPv4Address("10.101.0.1"), [], 0)
    first = await ipam.create_pool(*args)
    assert (await ipam.create_pool(*args)).uid == first.uid


async def test_delete_refused_while_leased_then_allowed(ipam):
    await ipam.allocate("m", pool="p")
    with pytest.raises(PoolRejectedError) as exc:
        await ipam.delete_pool("p")
    await ipam.release("m")
    await ipam.delete_pool("p")
    assert exc.value.reason == "pool_in_use"
    assert await ipam.list_pools() == []


async def test_reserving_a_leased_address_is_refused(ipam):
    await ipam.allocate("m", pool="p")
    with pytest.raises(PoolRejectedError) as exc:
        await ipam.update_pool("p", ["10.100.0.2"], None)
    assert exc.value.reason == "ip_taken"


async def test_unreserved_addresses_become_allocatable(ipam):
    await _fill(ipam, 26)
    await ipam.update_pool("p", [], None)
    got = await _fill(ipam, 3, prefix="u")
    assert sorted(got) == ["10.100.0.10", "10.100.0.11", "10.100.0.12"]


async def test_newly_reserved_free_address_is_not_handed_out(ipam, clock):
    ips = await _fill(ipam, 26)
    await ipam.release("m0")
    clock.advance(7200)
    await ipam.update_pool("p", ["10.100.0.10-10.100.0.12", ips[0]], None)
    with pytest.raises(AllocationError) as exc:
        await ipam.allocate("x", pool="p")
    assert exc.value.reason == "pool_exhausted"


async def test_a_late_allocate_of_a_released_machine_is_refused(ipam):
    await ipam.allocate("m", pool="p")
    await ipam.release("m")
    with pytest.raises(AllocationError) as exc:
        await ipam.allocate("m", pool="p")
    assert exc.value.reason == "machine_released"


class InterleavingStore(MemoryIpamStore):
    """The in-memory store, but every call yields to the loop a random few times, so that
    concurrent tasks interleave between any two store calls as they do on a real database."""

    def __init__(self, seed: int, spread: int = 4) -> None:
        super().__init__()
        self._rng = random.Random(seed)
        self._spread = spread

    def __getattribute__(self, name: str):
        attr = super().__getattribute__(name)
        if name.startswith("_") or not inspect.iscoroutinefunction(attr):
            return attr

        async def call(*args, **kwargs):
            for _ in range(self._rng.randrange(self._spread)):
                await asyncio.sleep(0)
            return await attr(*args, **kwargs)

        return call


@pytest.mark.parametrize("seed", range(40))
async def test_duplicate_deliveries_on_two_replicas_strand_no_address(clock, seed):
    store = InterleavingStore(seed)
    a, b = (Ipam(store, block_size=8, pool_cache_s=0, clock=clock) for _ in range(2))
    await a.create_pool("p", "dc1", 100, "10.100.0.0/27", IPv4Address("10.100.0.1"), [], 0)
    for rnd in range(3):  # each machine's allocate delivered three times at once
        got = await asyncio.gather(
            *[
                (a, b)[(i + d) % 2].allocate(f"r{rnd}-m{i}", pool="p")
                for i in range(12)
                for d in range(3)
            ]
        )
        assert len({(x.machine_id, x.ip) for x in got}) == 12
        await asyncio.gather(*[(a, b)[i % 2].release(f"r{rnd}-m{i}") for i in range(12)])
        clock.advance(1)

    final = await asyncio.gather(*[(a, b)[i % 2].allocate(f"f{i}", pool="p") for i in range(29)])

    assert len({x.ip for x in final}) == 29  # the whole /27 (29 without the gateway) again
    with pytest.raises(AllocationError, match="no free address"):
        await a.allocate("one-too-many", pool="p")


class ReleaseDuringCheck(MemoryIpamStore):
    """Holds the first history read (a claimer's check after its lease insert) until a release
    has written its history record, and that release's end of lease until the check is done."""

    def __init__(self) -> None:
        super().__init__()
        self.hold = False
        self.released = asyncio.Event()
        self.checked = asyncio.Event()

    async def get_history(self, hid: str) -> dict | None:
        if not self.hold:
            return await super().get_history(hid)
        self.hold = False
        await self.released.wait()
        try:
            return await super().get_history(hid)
        finally:
            self.checked.set()

    async def upsert_history(self, hid: str, fields: dict, on_insert: dict | None = None) -> None:
        await super().upsert_history(hid, fields, on_insert)
        self.released.set()

    async def end_lease(self, machine_id: str, ip: str, at: datetime) -> None:
        await self.checked.wait()
        for _ in range(10):  # let the claimer act on what it read
            await asyncio.sleep(0)
        await super().end_lease(machine_id, ip, at)


async def test_a_release_during_a_slow_duplicates_check_leaves_no_lease(clock):
    """One delivery inserts the lease and is slow to check it; a duplicate confirms it and
    answers; the requester releases at once. The slow one must see its own machine's release,
    not a stale claim (which would delete the lease, or take a second address)."""
    store = ReleaseDuringCheck()
    a, b = (Ipam(store, block_size=8, pool_cache_s=0, clock=clock) for _ in range(2))
    await a.create_pool("p", "dc1", 100, "10.100.0.0/27", IPv4Address("10.100.0.1"), [], 0)
    uid = (await store.get_pool("p"))["uid"]
    store.hold = True
    slow = asyncio.create_task(a.allocate("m", pool="p"))
    await asyncio.sleep(0)  # it inserts its lease, then waits in its check

    answered = await b.allocate("m", pool="p")
    await b.release("m")
    late = await slow

    assert late.ip == answered.ip
    assert await store.leases_of_pool(uid) == []
    with pytest.raises(AllocationError, match="released"):
        await a.allocate("m", pool="p")


async def test_a_stale_claim_is_left_to_its_claimer_until_it_is_abandoned(store, ipam, clock):
    """Another delivery must not delete a young stale claim (on FerretDB a second deleter can
    remove whatever lease the machine has next); an abandoned one (claimer died) it cleans up."""
    pool = await store.get_pool("p")
    x = "10.100.0.2"
    await store.upsert_history(
        history_id(x, pool["uid"], 1),
        {
            "ip": x,
            "pool": "p",
            "pool_uid": pool["uid"],
            "gen": 1,
            "machine_id": "earlier",
            "allocated_at": clock(),
            "released_at": clock(),
        },
    )
    await store.insert_lease(
        {
            "claim": "probe",
            "_id": "m",
            "active_ip": x,
            "ip": x,
            "gen": 1,
            "pool": "p",
            "pool_uid": pool["uid"],
            "dc": "dc1",
            "vlan_id": 100,
            "prefix_len": 27,
            "gateway": "10.100.0.1",
            "allocated_at": clock(),
            "request_id": None,
            "state": "active",
        }
    )
    other = Ipam(store, block_size=8, pool_cache_s=0, clock=clock, max_attempts=3)

    with pytest.raises(TransientError):
        await other.allocate("m", pool="p")
    still = await store.get_lease("m")
    clock.advance(other.abandoned_claim_s)
    got = await other.allocate("m", pool="p")

    assert still is not None and still["ip"] == x
    assert str(got.ip) != x
    assert (await store.get_lease("m"))["ip"] == str(got.ip)


class HoldClaimUntilRelease(MemoryIpamStore):
    """Holds the lease insert of machine ``n`` until some lease has ended."""

    def __init__(self) -> None:
        super().__init__()
        self.ended = asyncio.Event()

    async def insert_lease(self, doc: dict) -> None:
        if doc["_id"] == "n":
            await self.ended.wait()
        await super().insert_lease(doc)

    async def end_lease(self, machine_id: str, ip: str, at: datetime) -> None:
        await super().end_lease(machine_id, ip, at)
        self.ended.set()


async def test_history_never_shows_two_owners_when_a_claim_lands_after_a_slow_release(clock):
    """A replica died mid-release (history and queue entry written, lease still active); the
    next claimer stamps its lease, then its insert lands only after the redelivered release
    ended the lease, seconds later. Its record must not start before the release."""
    store = HoldClaimUntilRelease()
    ipam = Ipam(store, block_size=8, pool_cache_s=0, clock=clock)
    await ipam.create_pool("p", "dc1", 100, "10.100.0.0/27", IPv4Address("10.100.0.1"), [], 0)
    ips = await _fill(ipam, 29)  # the whole pool
    pool = await store.get_pool("p")
    x, uid = ips[0], pool["uid"]
    await store.upsert_history(
        history_id(x, uid, 1),
        {
            "ip": x,
            "pool": "p",
            "pool_uid": uid,
            "gen": 1,
            "machine_id": "m0",
            "released_at": clock(),
        },
        on_insert={"allocated_at": clock()},
    )
    pool_def = await ipam.pools.active("p")
    await ipam.sources.append_released(pool_def, int(IPv4Address(x)), 1, clock())
    claim = asyncio.create_task(ipam.allocate("n", pool="p"))
    await asyncio.sleep(0)  # the claimer has stamped its lease and waits to insert it

    clock.advance(5)
    await ipam.release("m0")  # the redelivered release
    got = await claim
    first = await store.get_history(history_id(x, uid, 1))
    second = await store.get_history(history_id(x, uid, 2))

    assert (str(got.ip), second["machine_id"]) == (x, "n")
    assert first["released_at"] <= second["allocated_at"]


class FerretDeletes(InterleavingStore):
    """The interleaving store, and a lease delete that works as FerretDB v1's does: it matches
    its filter, other tasks run, then it deletes whatever document has that ``_id`` by then."""

    async def delete_lease(self, machine_id: str, ip: str, claim_id: str | None = None) -> bool:
        doc = self.c[LEASES].get(machine_id)
        if doc is None or doc["active_ip"] != ip:
            return False
        if claim_id is not None and doc.get("claim_id") != claim_id:
            return False
        for _ in range(self._rng.randrange(4 * self._spread)):
            await asyncio.sleep(0)
        return self.c[LEASES].pop(machine_id, None) is not None


@pytest.mark.parametrize("seed", range(24))
async def test_one_delivery_alone_cleans_up_an_abandoned_claim(clock, seed):
    """A replica died holding a stale claim of machine m (gen 1 of .2 was another machine's).
    Once it is abandoned, three deliveries of m on two replicas find it; if two of them delete
    it, the later delete (by _id on FerretDB) removes the lease the earlier one inserted next:
    m is answered two addresses and one is stranded (issue 3, bug 6)."""
    store = FerretDeletes(seed)
    a, b = (Ipam(store, block_size=8, pool_cache_s=0, clock=clock) for _ in range(2))
    await a.create_pool("p", "dc1", 100, "10.100.0.0/27", IPv4Address("10.100.0.1"), [], 0)
    x = str((await a.allocate("earlier", pool="p")).ip)
    await a.release("earlier")
    pool = await store.get_pool("p")
    await store.insert_lease(
        {
            "claim": "probe",
            "claim_id": "of-the-dead-replica",
            "_id": "m",
            "active_ip": x,
            "ip": x,
            "gen": 1,
            "pool": "p",
            "pool_uid": pool["uid"],
            "dc": "dc1",
            "vlan_id": 100,
            "prefix_len": 27,
            "gateway": "10.100.0.1",
            "allocated_at": clock(),
            "request_id": None,
            "state": "active",
        }
    )
    clock.advance(a.abandoned_claim_s)

    got = await asyncio.gather(*[(a, b)[d % 2].allocate("m", pool="p") for d in range(3)])
    held = await store.get_lease("m")
    assert {str(g.ip) for g in got} == {held["ip"]}  # one answer, and it is m's lease

    await b.release("m")
    final = await asyncio.gather(*[(a, b)[i % 2].allocate(f"f{i}", pool="p") for i in range(29)])
    assert len({f.ip for f in final}) == 29  # nothing stranded: the whole /27 again
    with pytest.raises(AllocationError, match="no free address"):
        await a.allocate("one-too-many", pool="p")


async def test_an_elected_deleter_that_died_is_replaced(store, ipam, clock):
    """The delivery elected to delete an abandoned claim died before deleting it: the others
    leave the claim to it for abandoned_claim_s, then elect another deleter, so the machine is
    not stuck behind its stale claim for good."""
    await ipam.allocate("earlier", pool="p")
    await ipam.release("earlier")
    x, uid = "10.100.0.2", (await store.get_pool("p"))["uid"]
    stale = {
        "claim": "probe",
        "claim_id": "of-the-dead-replica",
        "_id": "m",
        "active_ip": x,
        "ip": x,
        "gen": 1,
        "pool": "p",
        "pool_uid": uid,
        "dc": "dc1",
        "vlan_id": 100,
        "prefix_len": 27,
        "gateway": "10.100.0.1",
        "allocated_at": clock(),
        "request_id": None,
        "state": "active",
    }
    await store.insert_lease(stale)
    clock.advance(ipam.abandoned_claim_s)
    dead = {"_id": cleanup_id("m", "of-the-dead-replica", 0), "machine_id": "m", "at": clock()}
    await store.claim_cleanup(dead)
    other = Ipam(store, block_size=8, pool_cache_s=0, clock=clock, max_attempts=3)

    with pytest.raises(TransientError):
        await other.allocate("m", pool="p")
    still = await store.get_lease("m")
    clock.advance(ipam.abandoned_claim_s)
    got = await other.allocate("m", pool="p")

    assert still == stale
    assert str(got.ip) != x
    assert (await store.get_lease("m"))["ip"] == str(got.ip)
