"""The store contract: the MongoDB store and its in-memory twin behave the same."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from libs.common.errors import TransientError
from services.gateway.domain import Res
from services.gateway.fakes import MemoryGatewayStore
from services.gateway.listing import MachineIndex
from services.gateway.store import GatewayStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["memory", "mongo", "indexed"])
async def store(request, mongo_db):
    """The in-memory twin, the store on the real database, and that store with the machine
    list served from its in-memory index (loaded, so pages come from memory)."""
    if request.param == "memory":
        s = MemoryGatewayStore()
    elif request.param == "mongo":
        s = GatewayStore(mongo_db)
    else:
        s = GatewayStore(mongo_db, MachineIndex(refresh_s=3600))
    await s.setup()
    if request.param == "indexed":
        await s.index.reload(s.all_summaries)
    return s


def _doc(mid: str, state: str = "running", host: str | None = "h1", **over) -> dict:
    return {"_id": mid, "type": "docker", "app": "web", "image": "i", "cpus": 1.0,
            "memory": 100, "disk": 1000, "dc": "dc1", "vlan_id": 1, "hostname": mid,
            "state": state, "host": host, "ip": None, "created_at": T0, "updated_at": T0,
            "transitions": [], "saga": None, **over}


async def test_transition_applies_only_from_the_expected_state(store):
    await store.insert_machines([_doc("m1", "creating")])
    first = await store.transition("m1", ["creating"], "running", saga=None)
    second = await store.transition("m1", ["creating"], "running", saga=None)

    assert first["state"] == "running"
    assert [t["state"] for t in first["transitions"]] == ["running"]
    assert second is None


async def test_a_summary_write_wakes_waiters_and_says_what_was_written(store, request):
    """What ``POST /v1/machines?wait`` relies on instead of reading the database in a loop."""
    await store.insert_machines([_doc("m1", "creating", saga={"op": "create"})])
    woken = store.writes.next()
    await store.transition("m1", ["creating"], "running", saga=None)
    unrelated = store.writes.next()
    await store.update("m1", {}, {"lifecycle_at": T0})  # no summary field: no wake

    assert woken.done() and not unrelated.done()
    if "mongo" in request.node.name:  # no listing index: nothing is kept in memory
        assert store.written("m1") is None
    else:
        assert (store.written("m1")["state"], store.written("m1")["pending"]) == ("running", None)


async def test_the_unreachable_machines_of_a_host_are_found_and_only_theirs(store):
    await store.insert_machines([
        _doc("m1", "running"), _doc("m2", "running"), _doc("m3", "unreachable", host="h2"),
        _doc("m4", "unreachable"),
    ])  # fmt: skip
    await store.transition("m1", ["running"], "unreachable", reason="host_down")

    found = await store.unknown_on_host("h1")
    await store.transition("m4", ["unreachable"], "running", reason="host_back")
    after = await store.unknown_on_host("h1")

    assert sorted(d["_id"] for d in found) == ["m1", "m4"]
    assert [d["_id"] for d in after] == ["m1"]
    assert [d["_id"] for d in await store.unknown_on_host("h2")] == ["m3"]


async def test_a_transition_conditional_on_a_field_applies_only_when_it_matches(store):
    """What orders lifecycle events: ``lifecycle_at`` set once, then compared with ``$lte``."""
    await store.insert_machines([_doc("m1", "running")])
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    unset = {"lifecycle_at": {"$exists": False}}
    set_once = await store.update("m1", unset, {"lifecycle_at": epoch})
    again = await store.update("m1", unset, {"lifecycle_at": T0})
    newer = T0 + timedelta(seconds=30)
    started = await store.update("m1", {"lifecycle_at": {"$lte": newer}}, {"lifecycle_at": newer})
    older_die = await store.transition(
        "m1", ["running"], "stopped", match={"lifecycle_at": {"$lte": T0}},
        set_={"lifecycle_at": T0},
    )  # fmt: skip
    latest = newer + timedelta(seconds=60)
    later_die = await store.transition(
        "m1", ["running"], "stopped", match={"lifecycle_at": {"$lte": latest}},
        set_={"lifecycle_at": latest},
    )  # fmt: skip

    assert set_once is not None and again is None
    assert started is not None
    assert older_die is None
    assert later_die is not None and later_die["state"] == "stopped"
    assert (await store.get("m1"))["state"] == "stopped"


async def test_concurrent_writes_to_one_machine_all_land(store):
    """FerretDB v1 would let the later of two concurrent writes erase the earlier one."""
    await store.insert_machines([_doc("m1", "creating")])
    await asyncio.gather(
        store.transition("m1", ["creating"], "running"),
        *(store.update("m1", {}, {f"note{i}": i}) for i in range(5)),
    )
    doc = await store.get("m1")

    assert doc["state"] == "running"
    assert [doc.get(f"note{i}") for i in range(5)] == list(range(5))


async def test_update_matches_dotted_saga_fields(store):
    saga = {"op": "create", "step": "ip", "attempt": 1, "deadline": T0}
    await store.insert_machines([_doc("m1", saga=saga)])
    stale = await store.update("m1", {"saga.attempt": 2}, {"saga": None})
    fresh = await store.update("m1", {"saga.op": "create", "saga.attempt": 1}, {"saga": None})

    assert stale is None
    assert fresh["saga"] is None


async def test_due_sagas_and_in_flight(store):
    await store.insert_machines([
        _doc("m1", saga={"op": "create", "step": "ip", "attempt": 1, "deadline": T0}),
        _doc("m2", saga={"op": "create", "step": "ip", "attempt": 1,
                         "deadline": T0 + timedelta(hours=1)}),
        _doc("m3"),
    ])

    assert [d["_id"] for d in await store.due_sagas(T0 + timedelta(seconds=1))] == ["m1"]
    assert sorted(d["_id"] for d in await store.in_flight()) == ["m1", "m2"]

    # A step moved on (a new deadline) and a saga ended: the next tick sees both.
    later = {"op": "create", "step": "place", "attempt": 1, "deadline": T0 + timedelta(hours=2)}
    await store.update("m1", {"saga.step": "ip"}, {"saga": later})
    await store.update("m2", {}, {"saga": None})
    await store.update("m3", {}, {"saga": {**later, "deadline": T0}})
    assert [d["_id"] for d in await store.due_sagas(T0 + timedelta(hours=1, seconds=1))] == ["m3"]


async def test_load_counts_active_placed_machines_of_the_dc_only(store):
    await store.insert_machines([
        _doc("m1"), _doc("m2", "stopped"), _doc("m3", "failed"), _doc("m4", "destroyed"),
        _doc("m5", host="h2"), _doc("m6", "requested", host=None),
        _doc("m7", host="h2", app="db"), _doc("m8", dc="dc2", host="h9"),
    ])
    load = await store.load("dc1")

    assert load.allocated == {"h1": Res(2.0, 200, 2000), "h2": Res(2.0, 200, 2000)}
    assert load.apps == {"web": {"h1": 2, "h2": 1}, "db": {"h2": 1}}
    assert await store.allocations("dc1") == load.allocated


async def test_insert_keeps_existing_ids_and_find_pages(store):
    await store.insert_machines([_doc("m1"), _doc("m2")])
    await store.insert_machines([_doc("m2", "failed"), _doc("m3")])
    page1 = await store.find({"state": "running"}, 2)
    page2 = await store.find({"state": "running"}, 2, after=page1[-1]["_id"])

    assert [d["_id"] for d in page1 + page2] == ["m1", "m2", "m3"]


async def test_idempotency_first_writer_wins(store):
    first = await store.claim_idempotency("k", "f1", ["a"])
    second = await store.claim_idempotency("k", "f2", ["b"])

    assert first is None
    assert (second["fingerprint"], second["ids"]) == ("f1", ["a"])


async def test_host_status_is_compare_and_set(store):
    await store.record_heartbeat({"_id": "h1", "dc": "dc1", "last_seen": T0, "status": "online"})

    assert await store.set_host_status("h1", "online", "down") is True
    assert await store.set_host_status("h1", "online", "down") is False


async def test_a_heartbeat_with_dotted_label_keys_is_recorded_and_read_back(store):
    """The labels' keys (``dockvm.metrics.monitor``) hold dots, which FerretDB refuses as
    field names: a host started by hosts.sh had every heartbeat refused."""
    labels = {"dockvm.metrics.monitor": "127.0.0.1:9114", "dockvm.overcommit.cpu": "2"}
    host = {"_id": "h1", "dc": "dc1", "last_seen": T0, "status": "online", "labels": labels}

    first = await store.record_heartbeat(host)
    again = await store.record_heartbeat({**host, "last_seen": T0 + timedelta(seconds=10)})
    [listed] = await store.list_hosts()

    assert first is None
    assert again["labels"] == labels
    assert listed["labels"] == labels


async def test_prune_forgets_old_idempotency_keys_and_audit_entries(store):
    await store.claim_idempotency("old", "f", ["m1"])
    cutoff = datetime.now(UTC) + timedelta(seconds=1)
    await asyncio.sleep(1.1)
    await store.claim_idempotency("new", "f", ["m2"])
    if isinstance(store, GatewayStore):
        await store.audit_write({"at": cutoff - timedelta(days=1), "who": "a"})
        await store.audit_write({"at": cutoff + timedelta(days=1), "who": "b"})
    else:
        store.audit += [{"at": cutoff - timedelta(days=1), "who": "a"},
                        {"at": cutoff + timedelta(days=1), "who": "b"}]

    pruned = await store.prune(cutoff, cutoff)

    assert pruned == (1, 1)
    assert await store.get_idempotency("old") is None
    assert (await store.get_idempotency("new"))["ids"] == ["m2"]


async def test_more_concurrent_large_reads_than_ferretdbs_pool_all_finish(mongo_db):
    """150 placements' reads of a 300-machine dc at once, with writes: none may wedge FerretDB
    (a multi-batch cursor holds one of its 100 SQLite connections until exhausted)."""
    store = GatewayStore(mongo_db)
    await store.setup()
    ids = [f"m{i:04d}" for i in range(300)]
    await store.insert_machines([_doc(mid, host=f"h{i % 3}") for i, mid in enumerate(ids)])

    async def write(mid: str, n: int) -> None:
        while True:  # SQLITE_BUSY under write load is transient: a client retries it
            try:
                await store.update(mid, {}, {"note": n})
                return
            except TransientError:
                await asyncio.sleep(0.05)

    async def writes() -> None:
        for n, mid in enumerate(ids[:60]):
            await write(mid, n)

    async with asyncio.timeout(120):
        results = await asyncio.gather(
            *(store.allocations("dc1") for _ in range(150)), *(writes() for _ in range(5))
        )
        after = await store.get(ids[-1])

    assert all(sum(r.cpus for r in a.values()) == 300.0 for a in results[:150])
    assert after is not None and after["_id"] == ids[-1]


async def _listed(store) -> None:
    """Machines for the listing cases, changed through the store as the sagas change them."""
    await store.insert_machines([
        _doc("m1", ip="10.0.0.1"), _doc("m2", "creating", host="h2", ip="10.0.0.2"),
        _doc("m3", "requested", host=None, app="db"), _doc("m4", "stopped", ip="10.0.0.4"),
        _doc("m5", host="h2", app="db"),
    ])
    await store.transition("m2", ["creating"], "running", saga=None)
    await store.transition("m3", ["requested"], "creating", via=["ip_assigned", "placed"],
                           set_={"host": "h1", "ip": "10.0.0.3"},
                           saga={"op": "create", "step": "container", "attempt": 1,
                                 "deadline": T0})
    await store.update("m4", {}, {"last_op": {"ok": True}})
    await store.update("m5", {}, {"saga": {"op": "destroy", "step": "container", "attempt": 1,
                                           "deadline": T0}})


@pytest.mark.parametrize(
    ("filters", "limit", "after", "expected"),
    [
        ({}, 10, None, ["m1", "m2", "m3", "m4", "m5"]),
        ({}, 2, "m2", ["m3", "m4"]),
        ({"app": "db"}, 10, None, ["m3", "m5"]),
        ({"state": "running"}, 10, None, ["m1", "m2", "m5"]),
        ({"host": "h1"}, 10, None, ["m1", "m3", "m4"]),
        ({"ip": "10.0.0.3"}, 10, None, ["m3"]),
        ({"_id": {"$in": ["m1", "m3", "m5"]}}, 10, "m1", ["m3", "m5"]),
    ],
)
async def test_summaries_list_what_the_machines_are(store, filters, limit, after, expected):
    await _listed(store)
    page = await store.summaries(filters, limit, after)
    machines = {d["_id"]: d for d in await store.by_ids(expected)}

    assert [s["_id"] for s in page] == expected
    assert [
        (s["state"], s["host"], s["ip"], s["app"], s["hostname"], s["pending"]) for s in page
    ] == [
        (m["state"], m["host"], m["ip"], m["app"], m["hostname"], (m["saga"] or {}).get("op"))
        for m in (machines[i] for i in expected)
    ]
    assert "transitions" not in page[0]


async def test_setup_builds_missing_and_stale_summaries_once(mongo_db):
    """A database older than summaries, or a crash between a machine's two writes."""
    await mongo_db["machines"].insert_many(
        [_doc("m1"), _doc("m2", "creating"), _doc("m3", saga={"op": "stop"})]
    )
    store = GatewayStore(mongo_db)
    await store.setup()
    await mongo_db["machines"].update_one({"_id": "m2"}, {"$set": {"state": "running"}})
    repaired = await store.repair_summaries()
    again = await store.repair_summaries()
    page = await store.summaries({}, 10)

    assert (repaired, again) == (1, 0)
    assert [(s["_id"], s["state"], s["pending"]) for s in page] == [
        ("m1", "running", None), ("m2", "running", None), ("m3", "running", "stop")]


async def test_summaries_written_before_they_carried_a_deadline_are_rewritten_only_if_due(mongo_db):
    """An upgrade: the saga tick finds due steps in the summaries, which used to lack ``due``."""
    deadline = T0 + timedelta(minutes=2)
    await mongo_db["machines"].insert_many([
        _doc("m1"), _doc("m2", "creating", saga={"op": "create", "deadline": deadline}),
    ])  # fmt: skip
    store = GatewayStore(mongo_db)
    await store.setup()
    await mongo_db["machine_summaries"].update_many({}, {"$unset": {"due": ""}})

    repaired = await store.repair_summaries()
    m2 = await mongo_db["machine_summaries"].find_one({"_id": "m2"})

    assert repaired == 1
    assert m2["due"].replace(tzinfo=UTC) == deadline


class _HeldSummary(GatewayStore):
    """The real store; the next summary write waits for ``go`` (or fails, with ``fail``)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.entered, self.go, self.fail = asyncio.Event(), asyncio.Event(), False

    async def _write_summary(self, doc) -> None:
        if self.fail:
            self.fail = False
            raise TransientError("the summary write failed")
        if not self.go.is_set():
            self.entered.set()
            await self.go.wait()
        await super()._write_summary(doc)


async def test_a_cancelled_caller_does_not_cut_a_machine_write_from_its_summary(mongo_db):
    """A handler cancelled between the two writes (the broker connection dropped under it)
    used to leave the summary one state behind for good."""
    store = _HeldSummary(mongo_db)
    await store.setup()
    store.go.set()
    await store.insert_machines([_doc("m1", "destroying")])
    store.go.clear()
    caller = asyncio.create_task(store.transition("m1", ["destroying"], "destroyed"))
    await store.entered.wait()  # the machine is written, its summary not yet
    caller.cancel()
    store.go.set()
    with pytest.raises(asyncio.CancelledError):
        await caller
    async with asyncio.timeout(10):
        while (await store.summaries({"_id": "m1"}, 1))[0]["state"] != "destroyed":
            await asyncio.sleep(0.05)
    machine = await store.get("m1")

    assert machine["state"] == "destroyed"


async def test_a_failed_summary_write_is_repaired_by_the_next_tick(mongo_db):
    store = _HeldSummary(mongo_db)
    await store.setup()
    store.go.set()
    await store.insert_machines([_doc("m1", "destroying")])
    store.fail = True
    with pytest.raises(TransientError):
        await store.transition("m1", ["destroying"], "destroyed")
    before = (await store.summaries({"_id": "m1"}, 1))[0]["state"]
    repaired, again = await store.repair_behind(), await store.repair_behind()
    after = (await store.summaries({"_id": "m1"}, 1))[0]["state"]

    assert (before, after) == ("destroying", "destroyed")
    assert (repaired, again) == (1, 0)
