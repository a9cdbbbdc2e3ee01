"""The monitor as a real process on the real stack: Docker, RabbitMQ and the MongoDB API.

Plus the contract test of the sample store, run against the in-memory fake and FerretDB alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest

from libs.common.bus import RpcClient
from libs.common.contracts.monitor import (
    ContainerDied,
    ContainerStarted,
    MetricsBatch,
    MetricsQuery,
    MetricsQueryResult,
)
from libs.common.db import mongo_client
from services.monitor.domain import ContainerMeta, Emit
from services.monitor.fakes import MemorySampleStore
from services.monitor.store import MongoSampleStore, SampleStore
from tests.support.stack import MONGO_URL

from .test_monitor_support import Sandbox, sandbox  # noqa: F401


async def test_monitor_publishes_exposes_and_keeps_history_after_destroy(
    sandbox: Sandbox, start_service, probe_factory, amqp  # noqa: F811
):
    host = f"it-{sandbox.run[:8]}"
    probe = await probe_factory("container.#", "metrics.batch")
    svc = await start_service(
        "monitor", "--host-id", host,
        env={"DOCKVM_MONITOR_INTERVAL_S": "1", "DOCKVM_MONITOR_LABEL": sandbox.selector},
    )
    container, machine, ip = await asyncio.to_thread(
        sandbox.run_container, "svc", ["sleep", "infinity"], cpus=0.5, memory="128m"
    )
    await probe.wait_for(ContainerStarted.TYPE, lambda m: m.machine_id == machine)
    await probe.wait_for(
        MetricsBatch.TYPE,
        lambda m: m.host == host and any(s.machine_id == machine for s in m.samples),
    )
    async with aiohttp.ClientSession() as http, http.get(f"{svc.url}/metrics") as r:
        exposition = await r.text()

    await asyncio.to_thread(container.remove, force=True)
    (died,) = await probe.wait_for(ContainerDied.TYPE, lambda m: m.machine_id == machine)
    rpc = RpcClient(amqp, source="tests")
    now = datetime.now(UTC)
    results = {
        step: await rpc.request(
            MetricsQuery.model_validate(
                {"ip": ip, "from": now - timedelta(minutes=10), "to": now + timedelta(minutes=1),
                 "step": step}
            )
        )
        for step in ("raw", "1m")
    }
    await rpc.close()

    labels = f'app="montest",host="{host}",ip="{ip}",machine_id="{machine}"'
    assert f"dockvm_container_memory_limit_bytes{{{labels}}} 1.34217728e+08" in exposition
    assert f"dockvm_container_cpu_quota_cpus{{{labels}}} 0.5" in exposition
    assert died.host == host
    assert all(isinstance(r, MetricsQueryResult) for r in results.values())
    assert results["raw"].points and results["1m"].points
    assert {p.machine_id for p in results["raw"].points} == {machine}
    assert sum(p.samples for p in results["1m"].points) == len(results["raw"].points)


# ------------------------------------------------------------ store contract

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(params=["memory", "mongo"])
async def store(request, db_name: str) -> AsyncIterator[SampleStore]:
    """The fake, or the real store on a fresh FerretDB database (dropped afterwards)."""
    client = mongo_client(MONGO_URL, app_name="dockvm-tests")
    s: SampleStore = (
        MemorySampleStore() if request.param == "memory" else MongoSampleStore(client[db_name])
    )
    await s.setup()
    yield s
    await client.drop_database(db_name)
    await client.close()


def _doc(ip: str, minutes: int) -> dict:
    return {"ip": ip, "t": T0 + timedelta(minutes=minutes), "machine_id": f"m-{ip}",
            "cpu_percent": float(minutes), "mem_usage": 1, "mem_working_set": 1,
            "mem_limit": 2, "pids": 1, "d": {"net_rx_bytes": 10}}


async def test_store_queries_an_ip_by_time_range_in_order(store: SampleStore):
    await store.add_samples([_doc("10.0.0.1", m) for m in (3, 1, 2, 9)] + [_doc("10.0.0.2", 2)])
    found = await store.samples("10.0.0.1", T0 + timedelta(minutes=1), T0 + timedelta(minutes=9))
    assert [d["cpu_percent"] for d in found] == [1.0, 2.0, 3.0]


async def test_store_retention_deletes_only_older_samples(store: SampleStore):
    await store.add_samples([_doc("10.0.0.1", m) for m in (1, 2, 3)])
    deleted = await store.prune(T0 + timedelta(minutes=2))
    left = await store.samples("10.0.0.1", T0, T0 + timedelta(days=1))
    assert (deleted, [d["cpu_percent"] for d in left]) == (1, [2.0, 3.0])


async def test_store_query_spans_hours_and_rounds(store: SampleStore):
    for minutes in (10, 50, 70, 125, 135, 190):  # one round each, over four hours
        await store.add_samples([_doc("10.0.0.1", minutes), _doc("10.0.0.2", minutes + 1)])
    found = await store.samples("10.0.0.1", T0 + timedelta(minutes=30),
                                T0 + timedelta(minutes=135))
    assert [d["cpu_percent"] for d in found] == [50.0, 70.0, 125.0]


async def test_store_retention_drops_whole_hours_and_trims_the_boundary_hour(store: SampleStore):
    await store.add_samples(
        [_doc(ip, m) for ip in ("10.0.0.1", "10.0.0.2") for m in (10, 70, 125, 135)]
    )
    deleted = await store.prune(T0 + timedelta(minutes=130))
    left = {ip: [d["cpu_percent"] for d in await store.samples(ip, T0, T0 + timedelta(days=1))]
            for ip in ("10.0.0.1", "10.0.0.2")}
    assert (deleted, left) == (6, {"10.0.0.1": [135.0], "10.0.0.2": [135.0]})


async def test_store_keeps_adding_to_an_hour_after_its_boundary_was_trimmed(store: SampleStore):
    await store.add_samples([_doc("10.0.0.1", m) for m in (1, 2)])
    await store.prune(T0 + timedelta(minutes=2))
    await store.add_samples([_doc("10.0.0.1", 3)])
    left = await store.samples("10.0.0.1", T0, T0 + timedelta(hours=1))
    assert [d["cpu_percent"] for d in left] == [2.0, 3.0]


async def test_store_query_and_retention_span_days(store: SampleStore):
    days = (-1500, -10, 5, 1445, 2890)  # minutes from T0 (a midnight): four UTC days
    await store.add_samples([_doc(ip, m) for ip in ("10.0.0.1", "10.0.0.2") for m in days])
    found = await store.samples("10.0.0.1", T0 - timedelta(minutes=20),
                                T0 + timedelta(minutes=1445))
    deleted = await store.prune(T0 + timedelta(minutes=1440))
    left = await store.samples("10.0.0.1", T0 - timedelta(days=9), T0 + timedelta(days=9))
    assert [d["cpu_percent"] for d in found] == [-10.0, 5.0]
    assert (deleted, [d["cpu_percent"] for d in left]) == (6, [1445.0, 2890.0])


async def test_store_keeps_a_replayed_round_once(store: SampleStore):
    round_ = [_doc("10.0.0.1", 1), _doc("10.0.0.2", 1)]
    await store.add_samples(round_)
    await store.add_samples([*round_, _doc("10.0.0.1", 2)])
    found = await store.samples("10.0.0.1", T0, T0 + timedelta(hours=1))
    assert [d["cpu_percent"] for d in found] == [1.0, 2.0]


async def test_store_claims_a_lifecycle_event_until_it_is_published(store: SampleStore):
    msg = ContainerStarted(machine_id="m", container_id="c", host="h", at=T0, ip="10.0.0.1")
    emit = Emit("e1", msg)
    first, again = await store.claim_event("h", emit), await store.claim_event("h", emit)
    await store.event_published(emit)
    assert (first, again, await store.claim_event("h", emit)) == (True, True, False)


async def test_store_replay_point_only_moves_forward(store: SampleStore):
    await store.set_last_event_ns("h", 20)
    await store.set_last_event_ns("h", 10)
    assert (await store.last_event_ns("h"), await store.last_event_ns("other")) == (20, 0)


async def test_store_replay_point_is_zero_when_only_tracks_were_saved(store: SampleStore):
    # A monitor that saved its tracker before handling any Docker event must still start again.
    await store.save_tracks("h", [])
    assert await store.last_event_ns("h") == 0


def test_meta_needs_the_machine_label():
    assert ContainerMeta.from_labels("c", {"dockvm.ip": "10.0.0.1"}) is None


async def test_store_gives_back_events_that_never_went_out(store: SampleStore):
    msg = ContainerDied(machine_id="m", container_id="c", host="h", at=T0, ip="10.0.0.1",
                        exit_code=3)
    emit = Emit("e2", msg)
    await store.claim_event("h", emit)
    # A cutoff 1 s ahead: "older than 0 s" could miss a record made in the same millisecond.
    (pending,) = await store.unpublished("h", -1)
    await store.event_published(emit)
    assert (pending.id, pending.message) == ("e2", msg)
    assert await store.unpublished("h", -1) == []
