"""db helpers and the dedupe port, against the real MongoDB API (FerretDB) and the fake."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pymongo import ASCENDING, IndexModel

from libs.common.bus import Claim, MemoryDedupe, MongoDedupe
from libs.common.db import (
    DatabaseUnavailable,
    conflict_on_duplicate,
    ensure_indexes,
    mongo_client,
    ping,
)
from libs.common.errors import ConflictError


async def test_ensure_indexes_is_idempotent_and_enforces_uniqueness(mongo_db):
    indexes = {"things": [IndexModel([("key", ASCENDING)], unique=True, name="key_unique")]}
    await ensure_indexes(mongo_db, indexes)
    await ensure_indexes(mongo_db, indexes)
    await mongo_db.things.insert_one({"key": "a"})

    with pytest.raises(ConflictError, match=r"thing a already exists \(key=a\)"):
        async with conflict_on_duplicate("thing a", key="a"):
            await mongo_db.things.insert_one({"key": "a"})

    assert await mongo_db.things.count_documents({}) == 1


async def test_compound_unique_index(mongo_db):
    await ensure_indexes(mongo_db, {"pairs": [IndexModel([("a", 1), ("b", 1)], unique=True)]})
    await mongo_db.pairs.insert_one({"a": 1, "b": 1})
    await mongo_db.pairs.insert_one({"a": 1, "b": 2})

    with pytest.raises(ConflictError):
        async with conflict_on_duplicate("pair"):
            await mongo_db.pairs.insert_one({"a": 1, "b": 2})


async def test_ping_of_a_dead_server_names_the_component():
    client = mongo_client("mongodb://127.0.0.1:1/", app_name="t", timeout_ms=300)

    with pytest.raises(DatabaseUnavailable, match="MongoDB API is not reachable"):
        await ping(client["x"])
    await client.close()


@pytest.fixture(params=["memory", "mongo"])
def dedupe(request, mongo_db):
    """The same contract runs against the fake and the real adapter."""
    if request.param == "memory":
        return MemoryDedupe()
    return MongoDedupe(mongo_db["bus_processed"], "svc")


async def test_dedupe_contract_claim_complete(dedupe):
    assert await dedupe.claim("m1") is Claim.NEW
    assert await dedupe.claim("m1") is Claim.BUSY
    await dedupe.complete("m1")
    assert await dedupe.claim("m1") is Claim.DONE


async def test_dedupe_contract_release_allows_retry(dedupe):
    assert await dedupe.claim("m2") is Claim.NEW
    await dedupe.release("m2")
    assert await dedupe.claim("m2") is Claim.NEW


async def test_stale_claim_of_a_crashed_worker_is_taken_over(mongo_db):
    coll = mongo_db["bus_processed"]
    old = datetime.now(UTC) - timedelta(minutes=10)
    await coll.insert_one({"_id": "svc:m3", "state": "processing", "at": old})

    assert await MongoDedupe(coll, "svc", lease_s=60).claim("m3") is Claim.NEW


async def test_prune_forgets_old_ids_whatever_their_state_and_keeps_recent_ones(mongo_db):
    coll = mongo_db["bus_processed"]
    dedupe = MongoDedupe(coll, "svc")
    nine_days_ago = datetime.now(UTC) - timedelta(days=9)
    await coll.insert_many([
        {"_id": "svc:old", "state": "done", "at": nine_days_ago},  # as earlier versions wrote
        {"_id": "svc:stuck", "state": "processing", "at": nine_days_ago},
    ])  # fmt: skip
    await dedupe.claim("new")
    await dedupe.complete("new")
    await dedupe.complete("new")  # a second mark is a no-op

    assert await dedupe.prune(timedelta(days=7)) == 2
    assert await dedupe.claim("new") is Claim.DONE
    assert await coll.count_documents({}) == 2  # the recent claim and its mark
