"""An address whose machine never ran goes straight back to the free list (no cooldown)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address

import pytest

from services.ipam.domain import AllocationError
from services.ipam.fakes import MemoryIpamStore
from services.ipam.service import Ipam


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
async def ipam(clock) -> Ipam:
    ipam = Ipam(MemoryIpamStore(), block_size=8, pool_cache_s=0, clock=clock)
    # /29: .2-.6 allocatable, an hour of cooldown.
    await ipam.create_pool("p", "dc1", 100, "10.100.0.0/29", IPv4Address("10.100.0.1"), [], 3600)
    return ipam


async def _fill(ipam: Ipam, prefix: str = "m", n: int = 5) -> list[str]:
    return [str((await ipam.allocate(f"{prefix}{i}", pool="p")).ip) for i in range(n)]


async def test_a_release_that_never_ran_is_handed_out_again_at_once(ipam):
    ips = await _fill(ipam)
    await ipam.release("m1")  # ran: cools down, ahead in the queue
    await ipam.release("m3", ever_ran=False)
    again = await ipam.allocate("n0", pool="p")

    assert str(again.ip) == ips[3]
    with pytest.raises(AllocationError) as none_left:
        await ipam.allocate("n1", pool="p")
    assert none_left.value.reason == "pool_exhausted"  # m1's address still cools


async def test_lookup_usage_and_a_named_claim_see_it_free(ipam):
    ips = await _fill(ipam)
    await ipam.release("m1")
    await ipam.release("m2", ever_ran=False)
    info = await ipam.lookup(IPv4Address(ips[2]))
    usage = (await ipam.list_pools())[0]
    named = await ipam.allocate("kvm", pool="p", ip=IPv4Address(ips[2]))

    assert (info.state, info.cooling_until) == ("free", None)
    assert [(e.machine_id, e.action) for e in info.history] == [
        ("m2", "allocated"),
        ("m2", "released"),
    ]
    assert (usage.allocated, usage.cooling, usage.free) == (3, 1, 1)
    assert str(named.ip) == ips[2]


async def test_a_release_that_ran_still_cools_down(ipam, clock):
    ips = await _fill(ipam)
    await ipam.release("m4")
    info = await ipam.lookup(IPv4Address(ips[4]))
    with pytest.raises(AllocationError) as cooling:
        await ipam.allocate("n0", pool="p")
    clock.advance(3601)
    cooled = await ipam.allocate("n0", pool="p")

    assert info.state == "cooling"
    assert cooling.value.reason == "pool_exhausted"
    assert str(cooled.ip) == ips[4]


async def test_after_a_machine_that_never_ran_the_next_that_ran_cools_down(ipam):
    ips = await _fill(ipam)
    await ipam.release("m0", ever_ran=False)
    await ipam.allocate("n0", pool="p")
    await ipam.release("n0")
    info = await ipam.lookup(IPv4Address(ips[0]))

    assert info.state == "cooling"
    with pytest.raises(AllocationError):
        await ipam.allocate("n1", pool="p")


async def test_a_rolled_back_bulk_claim_of_a_ready_address_stays_ready(ipam):
    ips = await _fill(ipam, "m", 4)
    await ipam.release("m0", ever_ran=False)
    with pytest.raises(AllocationError):
        await ipam.allocate_many("r1", ["b0", "b1", "b2"], pool="p")  # 2 free: rolled back
    got = await ipam.allocate_many("r2", ["c0", "c1"], pool="p")

    assert sorted(str(a.ip) for a in got) == sorted([ips[0], "10.100.0.6"])


async def test_a_redelivered_release_answers_again(ipam):
    await _fill(ipam, "m", 1)
    first = await ipam.release("m0", ever_ran=False)
    second = await ipam.release("m0", ever_ran=False)

    assert (first["ip"], first["ever_ran"]) == ("10.100.0.2", False)
    assert second["ip"] == "10.100.0.2"


async def test_another_replicas_never_ran_release_is_seen_at_once(ipam, clock):
    other = Ipam(ipam.store, block_size=8, pool_cache_s=60, clock=clock)
    ips = await _fill(ipam)
    with pytest.raises(AllocationError):
        await other.allocate("probe", pool="p")  # the other replica finds the ready lane empty
    await ipam.release("m2", ever_ran=False)
    again = await other.allocate("n0", pool="p")

    assert str(again.ip) == ips[2]
