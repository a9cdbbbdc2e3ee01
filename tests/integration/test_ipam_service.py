"""ipam as a real process on the real RabbitMQ and MongoDB API: commands, events, RPC queries."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address

import pytest

from libs.common.bus import RpcClient, dlq_name
from libs.common.contracts.ipam import (
    IpAllocate,
    IpAllocated,
    IpAllocatedMany,
    IpAllocateMany,
    IpAllocationFailed,
    IpInfo,
    IpLookup,
    IpRelease,
    IpReleased,
    PoolChanged,
    PoolCreate,
    PoolDelete,
    PoolList,
    PoolListing,
    PoolRejected,
    PoolUpdate,
)

POOL = PoolCreate(
    name="v100",
    dc="dc1",
    vlan_id=100,
    cidr="10.100.0.0/29",
    gateway=IPv4Address("10.100.0.1"),
    cooldown_s=0,
)  # 5 allocatable addresses


@pytest.fixture
async def ipam(start_service):
    return await start_service("ipam")


@pytest.fixture
async def rpc(amqp, ipam):
    client = RpcClient(amqp, source="tests")
    yield client
    await client.close()


async def _listing(rpc: RpcClient, dc: str | None = None) -> PoolListing:
    reply = await rpc.request(PoolList(dc=dc))
    assert isinstance(reply, PoolListing)
    return reply


async def _alloc(rpc: RpcClient, machine: str, **kw) -> IpAllocated | IpAllocationFailed:
    return await rpc.request(IpAllocate(machine_id=machine, **{"pool": "v100", **kw}))


async def test_pool_lifecycle_over_rpc(rpc, probe_factory):
    probe = await probe_factory("pool.#")
    created = await rpc.request(POOL)
    updated = await rpc.request(PoolUpdate(name="v100", reserved=["10.100.0.6"], cooldown_s=60))
    listed = await _listing(rpc, "dc1")
    deleted = await rpc.request(PoolDelete(name="v100"))
    await probe.wait_for("pool.changed", count=3)
    assert (created, updated, deleted) == (
        PoolChanged(name="v100", action="created"),
        PoolChanged(name="v100", action="updated"),
        PoolChanged(name="v100", action="deleted"),
    )
    pool = listed.pools[0]
    assert (pool.cidr, pool.reserved, pool.cooldown_s) == ("10.100.0.0/29", ["10.100.0.6"], 60)
    assert pool.usage.model_dump() == {
        "total": 6,
        "allocated": 0,
        "cooling": 0,
        "reserved": 2,
        "free": 4,
    }
    assert (await _listing(rpc)).pools == []


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (POOL.model_copy(update={"name": "bad", "cidr": "10.7.0.0/33"}), "invalid"),
        (POOL.model_copy(update={"name": "bad", "cidr": "10.7.0.5/24"}), "invalid"),
        (POOL.model_copy(update={"name": "bad", "cidr": "10.7.0.0/24"}), "invalid"),  # gateway
        (
            POOL.model_copy(
                update={
                    "name": "bad",
                    "vlan_id": 5000,
                    "cidr": "10.100.9.0/24",
                    "gateway": IPv4Address("10.100.9.1"),
                }
            ),
            "invalid",
        ),
        (POOL.model_copy(update={"name": "bad", "vlan_id": 7, "cidr": "10.100.0.0/16"}), "overlap"),
        (
            POOL.model_copy(
                update={
                    "name": "bad",
                    "cidr": "10.101.0.0/24",
                    "gateway": IPv4Address("10.101.0.1"),
                }
            ),
            "vlan_taken",
        ),
        (PoolUpdate(name="nope", cooldown_s=5), "unknown_pool"),
        (PoolUpdate(name="v100", reserved=["10.100.0.2"]), "ip_taken"),
        (PoolDelete(name="v100"), "pool_in_use"),
    ],
)
async def test_bad_pool_commands_are_rejected_with_a_reason_and_change_nothing(
    rpc, probe_factory, command, reason
):
    await rpc.request(POOL)
    await _alloc(rpc, "holder")
    before = await _listing(rpc)
    probe = await probe_factory("pool.rejected")
    reply = await rpc.request(command)
    event = (await probe.wait_for("pool.rejected"))[0]
    assert isinstance(reply, PoolRejected)
    assert (reply.reason, event) == (reason, reply)
    assert await _listing(rpc) == before


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"pool": "nope"}, "unknown_pool"),
        ({"pool": None, "dc": "dc1", "vlan_id": 5000}, "unknown_pool"),
        ({"ip": IPv4Address("10.100.1.2")}, "ip_outside_pool"),
        ({"ip": IPv4Address("10.100.0.1")}, "ip_reserved"),
        ({"ip": IPv4Address("10.100.0.2")}, "ip_taken"),
    ],
)
async def test_bad_allocations_fail_with_a_reason_and_change_nothing(
    rpc, probe_factory, kw, reason
):
    await rpc.request(POOL)
    await _alloc(rpc, "holder")
    probe = await probe_factory("ip.allocation_failed")
    reply = await _alloc(rpc, "m1", **kw)
    event = (await probe.wait_for("ip.allocation_failed"))[0]
    assert isinstance(reply, IpAllocationFailed)
    assert (reply.reason, reply.machine_id, event) == (reason, "m1", reply)
    assert (await _listing(rpc)).pools[0].usage.allocated == 1


async def test_duplicate_and_concurrent_delivery_gives_one_lease(
    rpc, publisher, probe_factory, mongo_db
):
    await rpc.request(POOL)
    probe = await probe_factory("ip.allocated")
    cmd = IpAllocate(machine_id="dup", pool="v100")
    await asyncio.gather(
        *[publisher.publish(cmd) for _ in range(5)],
        *[publisher.publish(cmd, id="same-message-id") for _ in range(3)],
    )
    got = await probe.wait_for("ip.allocated", count=6)
    leases = await mongo_db["leases"].find({}).to_list()
    assert len({m.ip for m in got}) == 1
    assert [(lease["_id"], lease["ip"]) for lease in leases] == [("dup", str(got[0].ip))]


async def test_exhaustion_cooldown_and_least_recently_released_order(rpc):
    await rpc.request(POOL.model_copy(update={"cooldown_s": 3600}))
    ips = [(await _alloc(rpc, f"m{i}")).ip for i in range(5)]
    full = await _alloc(rpc, "extra")
    for i in (3, 0, 4):
        await rpc.request(IpRelease(machine_id=f"m{i}"))
    cooling = await _alloc(rpc, "extra")
    await rpc.request(PoolUpdate(name="v100", cooldown_s=0))
    reused = [(await _alloc(rpc, f"n{i}")).ip for i in range(3)]
    assert [str(ip) for ip in ips] == [f"10.100.0.{i}" for i in range(2, 7)]
    assert (full.reason, cooling.reason) == ("pool_exhausted", "pool_exhausted")
    assert reused == [ips[3], ips[0], ips[4]]


async def test_exact_ip_and_history_lookup(rpc):
    await rpc.request(POOL.model_copy(update={"cooldown_s": 3600}))
    kvm = await _alloc(rpc, "kvm-1", ip=IPv4Address("10.100.0.5"))
    await rpc.request(IpRelease(machine_id="kvm-1"))
    again = await _alloc(rpc, "kvm-2", ip=IPv4Address("10.100.0.5"))
    info = await rpc.request(IpLookup(ip=IPv4Address("10.100.0.5")))
    then = await rpc.request(IpLookup(ip=IPv4Address("10.100.0.5"), at=info.history[0].at))
    assert isinstance(info, IpInfo)
    assert (str(kvm.ip), again.reason) == ("10.100.0.5", "ip_cooling")
    assert (info.state, info.owner, info.pool) == ("cooling", None, "v100")
    assert [(h.machine_id, h.action) for h in info.history] == [
        ("kvm-1", "allocated"),
        ("kvm-1", "released"),
    ]
    assert then.owner_at == "kvm-1"


async def test_release_without_lease_is_a_noop_with_no_dead_letter(
    rpc, publisher, probe_factory, amqp
):
    await rpc.request(POOL)
    await _alloc(rpc, "real")
    probe = await probe_factory("ip.released")
    await publisher.publish(IpRelease(machine_id="ghost"))
    released = await rpc.request(IpRelease(machine_id="real"))
    await probe.wait_for("ip.released")
    channel = await amqp.channel()
    dlq = await channel.declare_queue(dlq_name("ipam"), passive=True)
    assert isinstance(released, IpReleased)
    assert [m.machine_id for m in probe.of_type("ip.released")] == ["real"]
    assert dlq.declaration_result.message_count == 0


async def test_bulk_is_all_or_nothing(rpc):
    await rpc.request(POOL)
    too_many = await rpc.request(
        IpAllocateMany(request_id="r1", pool="v100", machine_ids=[f"s{i}" for i in range(6)])
    )
    usage_after_failure = (await _listing(rpc)).pools[0].usage
    fits = await rpc.request(
        IpAllocateMany(request_id="r2", pool="v100", machine_ids=[f"s{i}" for i in range(5)])
    )
    assert isinstance(too_many, IpAllocationFailed)
    assert (too_many.reason, too_many.request_id) == ("pool_exhausted", "r1")
    assert (usage_after_failure.allocated, usage_after_failure.free) == (0, 5)
    assert isinstance(fits, IpAllocatedMany)
    assert len({a.ip for a in fits.allocations}) == 5


async def test_an_ip_whose_machine_never_ran_is_free_at_once(rpc):
    await rpc.request(POOL.model_copy(update={"cooldown_s": 3600}))
    ips = [(await _alloc(rpc, f"m{i}")).ip for i in range(5)]
    await rpc.request(IpRelease(machine_id="m1"))  # ran: cools down, first in the queue
    await rpc.request(IpRelease(machine_id="m3", ever_ran=False))
    info = await rpc.request(IpLookup(ip=ips[3]))
    usage = (await _listing(rpc)).pools[0].usage
    again = await _alloc(rpc, "n0")
    none_left = await _alloc(rpc, "n1")

    assert (info.state, info.cooling_until) == ("free", None)
    assert (usage.allocated, usage.cooling, usage.free) == (3, 1, 1)
    assert again.ip == ips[3]
    assert none_left.reason == "pool_exhausted"  # m1's address still cools
