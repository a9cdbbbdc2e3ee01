"""Contract of the ipam store port, run against the in-memory fake and the real MongoDB API."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from services.ipam.fakes import MemoryIpamStore
from services.ipam.store import (
    LeaseConflict,
    MongoIpamStore,
    cleanup_id,
    history_id,
    slot_id,
)

T0 = datetime(2026, 11, 24, 12, tzinfo=UTC)


@pytest.fixture(params=["memory", "mongo"])
async def store(request, mongo_db):
    s = MemoryIpamStore() if request.param == "memory" else MongoIpamStore(mongo_db)
    await s.setup()
    return s


def _lease(machine: str, ip: str, **extra) -> dict:
    return {
        "_id": machine,
        "active_ip": ip,
        "ip": ip,
        "gen": 1,
        "pool": "p",
        "pool_uid": "u",
        "allocated_at": T0,
        "request_id": None,
        **extra,
    }


@pytest.mark.parametrize("second", [_lease("m1", "10.0.0.9"), _lease("m2", "10.0.0.5")])
async def test_a_machine_or_an_ip_has_one_active_lease(store, second):
    await store.insert_lease(_lease("m1", "10.0.0.5"))
    with pytest.raises(LeaseConflict):
        await store.insert_lease(second)
    assert (await store.lease_of_ip("10.0.0.5"))["_id"] == "m1"


async def test_concurrent_claims_of_one_address_have_one_winner(store):
    results = await asyncio.gather(
        *[store.insert_lease(_lease(f"c{i}", "10.0.0.7")) for i in range(16)],
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, LeaseConflict) for r in results if r is not None)


async def test_delete_lease_only_of_that_ip_and_frees_both_keys(store):
    await store.insert_lease(_lease("m1", "10.0.0.5"))
    wrong = await store.delete_lease("m1", "10.0.0.6")
    right = await store.delete_lease("m1", "10.0.0.5")
    await store.insert_lease(_lease("m1", "10.0.0.5", gen=2))
    assert (wrong, right) == (False, True)
    assert (await store.get_lease("m1"))["gen"] == 2


async def test_a_delete_naming_a_claim_spares_a_later_claim_of_that_address(store):
    await store.insert_lease(_lease("m1", "10.0.0.5", claim_id="a"))
    first = await store.delete_lease("m1", "10.0.0.5", "a")
    await store.insert_lease(_lease("m1", "10.0.0.5", claim_id="b"))
    stale = await store.delete_lease("m1", "10.0.0.5", "a")
    assert (first, stale) == (True, False)
    assert (await store.get_lease("m1"))["claim_id"] == "b"


async def test_a_cleanup_round_has_one_winner(store):
    cid = cleanup_id("m1", "a", 0)
    won = await asyncio.gather(
        *[
            store.claim_cleanup({"_id": cid, "machine_id": "m1", "at": T0 + timedelta(seconds=i)})
            for i in range(8)
        ]
    )
    assert sum(won) == 1
    assert (await store.get_cleanup(cid))["at"] == T0 + timedelta(seconds=won.index(True))


async def test_history_generation_is_claimed_once_and_completed_by_upsert(store):
    hid = history_id("10.0.0.5", "u", 2)
    await store.insert_history(
        {"_id": hid, "machine_id": "m", "pool_uid": "u", "allocated_at": T0, "released_at": None}
    )
    with pytest.raises(LeaseConflict):
        await store.insert_history({"_id": hid, "machine_id": "other"})
    await store.upsert_history(hid, {"released_at": T0 + timedelta(hours=1)})
    await store.upsert_history(
        history_id("10.0.0.6", "u", 1),
        {
            "machine_id": "n",
            "pool_uid": "u",
            "allocated_at": T0,
            "released_at": T0 + timedelta(hours=3),
        },
    )
    assert (await store.get_history(hid))["machine_id"] == "m"
    assert (await store.history_of_machine("n"))["_id"] == history_id("10.0.0.6", "u", 1)
    assert await store.released_since("u", T0 + timedelta(hours=2)) == 1


async def test_a_free_queue_slot_is_written_once(store):
    first = await store.insert_slot({"_id": slot_id("u", 0), "pool_uid": "u", "ip_int": 5})
    again = await store.insert_slot({"_id": slot_id("u", 0), "pool_uid": "u", "ip_int": 6})
    assert (first, again) == (True, False)
    assert (await store.get_slot(slot_id("u", 0)))["ip_int"] == 5


async def test_a_block_is_claimed_once(store):
    first = await store.claim_block("u", 0, "a", T0)
    second = await store.claim_block("u", 0, "b", T0)
    await store.claim_block("u", 1, "b", T0)
    await store.mark_block_full("u", 0)
    assert (first, second) == (True, False)
    assert await store.open_blocks("u") == [1]


async def test_pools_unique_by_name_and_vlan_and_archived_on_delete(store):
    doc = {
        "_id": "p",
        "uid": "u1",
        "dc": "dc1",
        "vlan_id": 10,
        "first": 100,
        "last": 200,
        "state": "active",
        "block_hint": 3,
    }
    await store.insert_pool(doc)
    with pytest.raises(LeaseConflict):
        await store.insert_pool({**doc, "_id": "q", "uid": "u2"})
    await store.insert_pool(
        {**doc, "_id": "r", "uid": "u3", "vlan_id": 11, "first": 300, "last": 400}
    )
    await store.raise_hint("p", "block_hint", 7)
    await store.raise_hint("p", "block_hint", 5)
    hint = (await store.get_pool("p"))["block_hint"]
    hits = await store.overlapping_pools(150, 350, uid="u3")
    await store.delete_pool(await store.get_pool("p"))
    assert hint == 7
    assert [h["_id"] for h in hits] == ["p"]
    assert [d["_id"] for d in await store.list_pools("dc1")] == ["r"]
    assert [d["uid"] for d in await store.pools_containing(150)] == ["u1"]


async def test_an_ended_lease_frees_the_ip_and_stays_as_tombstone(store):
    await store.insert_lease(_lease("m1", "10.0.0.5", state="active"))
    await store.end_lease("m1", "10.0.0.5", T0)
    await store.insert_lease(_lease("m2", "10.0.0.5", state="active"))
    assert (await store.get_lease("m1"))["state"] == "released"
    assert [d["_id"] for d in await store.leases_of_pool("u")] == ["m2"]
