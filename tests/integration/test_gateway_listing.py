"""The machine list across gateway replicas: each serves pages from its in-memory index, its own
writes at once, the other replica's after a reload; queries by id always read the database."""

from __future__ import annotations

from datetime import UTC, datetime

from services.gateway.listing import MachineIndex
from services.gateway.store import GatewayStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _doc(mid: str, state: str = "requested") -> dict:
    return {"_id": mid, "type": "docker", "app": "web", "image": "i", "cpus": 1.0,
            "memory": 100, "disk": 1000, "dc": "dc1", "vlan_id": 1, "hostname": mid,
            "state": state, "host": None, "ip": None, "created_at": T0, "updated_at": T0,
            "transitions": [], "saga": None}  # fmt: skip


async def _replica(db) -> GatewayStore:
    store = GatewayStore(db, MachineIndex(refresh_s=3600))
    await store.setup()
    await store.index.reload(store.all_summaries)
    return store


async def test_each_replica_lists_its_own_writes_at_once_and_the_others_after_a_reload(mongo_db):
    a, b = await _replica(mongo_db), await _replica(mongo_db)
    await a.insert_machines([_doc("m1"), _doc("m2")])
    await a.transition("m1", ["requested"], "creating", set_={"host": "h1"})

    on_a = await a.summaries({}, 10)
    on_b_before = await b.summaries({}, 10)
    by_id_on_b = await b.summaries({"_id": {"$in": ["m1", "m2"]}}, 10)
    await b.index.reload(b.all_summaries)
    on_b_after = await b.summaries({"state": "creating"}, 10)

    assert [(s["_id"], s["state"]) for s in on_a] == [("m1", "creating"), ("m2", "requested")]
    assert on_b_before == []
    assert [(s["_id"], s["state"]) for s in by_id_on_b] == [("m1", "creating"), ("m2", "requested")]
    assert [(s["_id"], s["host"]) for s in on_b_after] == [("m1", "h1")]


async def test_a_replayed_insert_does_not_roll_the_index_back(mongo_db):
    a = await _replica(mongo_db)
    await a.insert_machines([_doc("m1")])
    await a.transition("m1", ["requested"], "creating")
    await a.insert_machines([_doc("m1"), _doc("m2")])  # the same request, replayed, plus one

    page = await a.summaries({}, 10)

    assert [(s["_id"], s["state"]) for s in page] == [("m1", "creating"), ("m2", "requested")]
