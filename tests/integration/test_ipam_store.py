"""Contract of the ipam store port, run against the in-memory fake and the real MongoDB API."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from services.ipam.store import LeaseConflict, MemoryIpamStore, MongoIpamStore

T0 = datetime(2026, 11, 24, 12, tzinfo=UTC)


@pytest.fixture(params=["memory", "mongo"])
async def store(request, mongo_db):
    s = MemoryIpamStore() if request.param == "memory" else MongoIpamStore(mongo_db)
    await s.setup()
    return s


def _lease(ip: int, gen: int = 1, machine: str | None = None, **extra) -> dict:
    mid = machine or f"m{ip}-{gen}"
    return {"_id": f"u:{ip}#{gen}", "ip": f"10.0.0.{ip}", "ip_int": ip, "gen": gen,
            "pool": "p", "pool_uid": "u", "machine_id": mid, "machine_key": mid,
            "active_ip": f"10.0.0.{ip}", "state": "active", "allocated_at": T0,
            "released_at": None, "request_id": None, **extra}


@pytest.mark.parametrize(
    "second",
    [
        _lease(5, gen=1, machine="other"),  # same _id
        _lease(5, gen=2, machine="other"),  # same active ip
        _lease(6, gen=1, machine="m5-1"),  # same active machine
    ],
)
async def test_a_second_active_lease_conflicts(store, second):
    await store.insert_lease(_lease(5))
    with pytest.raises(LeaseConflict):
        await store.insert_lease(second)
    assert (await store.latest_lease_of_ip("u", 5))["machine_id"] == "m5-1"


async def test_release_frees_ip_and_machine_but_keeps_history(store):
    await store.insert_lease(_lease(5))
    assert await store.mark_released("u:5#1", T0 + timedelta(seconds=1))
    assert not await store.mark_released("u:5#1", T0 + timedelta(seconds=2))
    await store.insert_lease(_lease(5, gen=2, machine="m5-1", allocated_at=T0 + timedelta(1)))
    history = await store.leases_of_ip("10.0.0.5")
    assert [(h["gen"], h["state"]) for h in history] == [(1, "released"), (2, "active")]
    assert (await store.active_lease_of_machine("m5-1"))["gen"] == 2
    assert (await store.last_lease_of_machine("m5-1"))["gen"] == 2


async def test_concurrent_claims_of_one_address_have_one_winner(store):
    results = await asyncio.gather(
        *[store.insert_lease(_lease(7, machine=f"c{i}")) for i in range(16)],
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, LeaseConflict) for r in results if r is not None)


async def test_free_list_is_ordered_by_release_and_cut_at_cooldown(store):
    for ip, minutes in ((3, 20), (1, 10), (2, 30), (4, 40)):
        doc = {"_id": f"u:{ip}#1", "pool_uid": "u", "ip_int": ip, "ip": f"10.0.0.{ip}",
               "gen": 1, "released_at": T0 + timedelta(minutes=minutes)}
        await store.add_free(doc)
        await store.add_free(doc)  # a duplicate is ignored
    got = await store.free_candidates("u", T0 + timedelta(minutes=30), 10)
    await store.delete_free("u:1#1")
    await store.delete_free_in_range("u", 3, 3)
    left = await store.free_candidates("u", T0 + timedelta(minutes=60), 10)
    assert [d["ip_int"] for d in got] == [1, 3, 2]
    assert [d["ip_int"] for d in left] == [2, 4]


async def test_a_block_is_claimed_once(store):
    first = await store.claim_block("u", 0, "a", T0)
    second = await store.claim_block("u", 0, "b", T0)
    await store.claim_block("u", 1, "b", T0)
    await store.mark_block_full("u", 0)
    assert (first, second) == (True, False)
    assert (await store.max_block("u"), await store.open_blocks("u")) == (1, [1])


async def test_range_and_count_queries(store):
    for ip in (10, 11, 12, 20):
        await store.insert_lease(_lease(ip))
    await store.mark_released("u:11#1", T0 + timedelta(minutes=5))
    await store.mark_released("u:12#1", T0 + timedelta(minutes=50))
    assert await store.leased_in_range("u", 10, 15) == {10, 11, 12}
    assert [d["ip_int"] for d in await store.active_in_range("u", 10, 15)] == [10]
    assert await store.count_active("u") == 2
    assert await store.count_cooling("u", T0 + timedelta(minutes=10)) == 1


async def test_pools_unique_by_name_and_vlan(store):
    doc = {"_id": "p", "uid": "u1", "dc": "dc1", "vlan_id": 10, "first": 100, "last": 200,
           "state": "active"}
    await store.insert_pool(doc)
    with pytest.raises(LeaseConflict):
        await store.insert_pool({**doc, "_id": "q", "uid": "u2"})
    await store.insert_pool({**doc, "_id": "r", "uid": "u3", "vlan_id": 11, "first": 300,
                             "last": 400})
    hits = await store.overlapping_pools(150, 350, uid="u3")
    await store.delete_pool("u1")
    assert [h["_id"] for h in hits] == ["p"]
    assert [d["_id"] for d in await store.list_pools("dc1")] == ["r"]
