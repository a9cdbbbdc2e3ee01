"""ipam under contention: 4 replicas as separate processes, more requesters than addresses, kill -9.

The requesters behave like the gateway: a request that gets no answer (its replica died) is
sent again, which is safe because allocate and release are idempotent by machine_id.

`make test` runs a short round (32 requesters on a /27, 4 cycles each); `make chaos` runs the
long one (64 requesters on a /26, 12 cycles each: 768 allocate/release cycles), selected by
DOCKVM_IPAM_RACE=long. Both keep more requesters than addresses, so exhaustion is exercised.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import defaultdict
from ipaddress import IPv4Address

import pytest

from libs.common.bus import RpcClient
from libs.common.contracts.envelope import Message
from libs.common.contracts.ipam import (
    IpAllocate,
    IpAllocated,
    IpAllocationFailed,
    IpRelease,
    PoolCreate,
)
from libs.common.errors import TransientError

LONG = os.environ.get("DOCKVM_IPAM_RACE") == "long"
PREFIX, REQUESTERS, CYCLES = (26, 64, 12) if LONG else (27, 32, 4)  # cycles per requester
POOL = PoolCreate(
    name="race",
    dc="dc1",
    vlan_id=42,
    cidr=f"10.42.0.0/{PREFIX}",
    gateway=IPv4Address("10.42.0.1"),
    cooldown_s=0,
)
ALLOCATABLE = 2 ** (32 - PREFIX) - 3  # network, broadcast, gateway
assert REQUESTERS > ALLOCATABLE


async def _ask(rpc: RpcClient, msg: Message) -> Message:
    """Send until answered: an unanswered request is repeated (new message, same machine)."""
    while True:
        try:
            return await rpc.request(msg, timeout=5)
        except TransientError:
            continue


async def _allocate(rpc: RpcClient, machine: str) -> IpAllocated:
    while True:
        reply = await _ask(rpc, IpAllocate(machine_id=machine, pool="race"))
        if isinstance(reply, IpAllocated):
            return reply
        assert isinstance(reply, IpAllocationFailed) and reply.reason == "pool_exhausted"
        await asyncio.sleep(0.02)  # more requesters than addresses: wait for a release


async def _requester(rpc: RpcClient, n: int, cycles: int, log: list) -> None:
    for c in range(cycles):
        machine = f"r{n}-c{c}"
        got = await _allocate(rpc, machine)
        log.append((machine, str(got.ip)))
        await _ask(rpc, IpRelease(machine_id=machine))


async def _assert_consistent(mongo_db, rpc: RpcClient, log: list) -> None:
    """No active lease left, leases of one IP never overlap, and the whole pool is reusable."""
    records = await mongo_db["ip_history"].find({"pool": "race"}).to_list()
    by_ip: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_ip[record["ip"]].append(record)
    chains = {ip: sorted(items, key=lambda d: d["gen"]) for ip, items in by_ip.items()}
    overlaps = [
        (ip, a["machine_id"], b["machine_id"])
        for ip, items in chains.items()
        for a, b in itertools.pairwise(items)
        if a["released_at"] is None or a["released_at"] > b["allocated_at"]
    ]
    gens_ok = all(
        [d["gen"] for d in items] == list(range(1, len(items) + 1)) for items in chains.values()
    )
    owners = {(record["machine_id"], record["ip"]) for record in records}
    assert await mongo_db["leases"].find({"state": "active"}).to_list() == []
    assert overlaps == []
    assert gens_ok
    assert set(log) <= owners
    assert len({m for m, _ in log}) == len(log)

    fresh = await asyncio.gather(*[_allocate_once(rpc, f"final-{i}") for i in range(ALLOCATABLE)])
    extra = await _ask(rpc, IpAllocate(machine_id="final-extra", pool="race"))
    assert len({a.ip for a in fresh}) == ALLOCATABLE
    assert isinstance(extra, IpAllocationFailed) and extra.reason == "pool_exhausted"


async def _allocate_once(rpc: RpcClient, machine: str) -> IpAllocated:
    """Allocate, allowing a replica a moment to see the addresses other replicas hold.

    Under the full suite's load a replica can answer pool_exhausted for a few seconds while
    another replica's block or the free queue still holds addresses (its caches last about a
    second per pass); the whole pool must still come back within 30 s.
    """
    for _ in range(300):
        reply = await _ask(rpc, IpAllocate(machine_id=machine, pool="race"))
        if isinstance(reply, IpAllocated) or reply.reason != "pool_exhausted":
            break
        await asyncio.sleep(0.1)
    assert isinstance(reply, IpAllocated), reply
    return reply


@pytest.fixture
async def replicas(start_service):
    return [await start_service("ipam") for _ in range(4)]


@pytest.fixture
async def rpc(amqp, replicas):
    client = RpcClient(amqp, source="tests")
    await _ask(client, POOL)
    yield client
    await client.close()


@pytest.mark.timeout(900 if LONG else 300)  # the long round takes minutes on a busy host
async def test_four_replicas_more_requesters_than_addresses_never_share_or_leak_an_ip(
    rpc, mongo_db
):
    log: list = []
    await asyncio.gather(*[_requester(rpc, n, CYCLES, log) for n in range(REQUESTERS)])
    assert len(log) == REQUESTERS * CYCLES
    await _assert_consistent(mongo_db, rpc, log)


@pytest.mark.timeout(900 if LONG else 300)
async def test_kill_9_of_a_replica_mid_run_leaves_the_store_consistent(rpc, replicas, mongo_db):
    log: list = []
    run = asyncio.gather(*[_requester(rpc, n, CYCLES // 2, log) for n in range(REQUESTERS)])
    total = REQUESTERS * (CYCLES // 2)
    while len(log) < total // 3:  # kill with two thirds of the work still to do
        await asyncio.sleep(0.05)
    replicas[0].kill()
    await run
    assert replicas[0].proc.returncode == -9
    assert len(log) == total
    await _assert_consistent(mongo_db, rpc, log)
