"""The monitor as a real process on the real stack: Docker, RabbitMQ and the MongoDB API.

Plus the contract test of the monitor's store, run against the in-memory fake and FerretDB alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aiohttp
import pytest

from libs.common.contracts.monitor import ContainerDied, ContainerStarted, MetricsBatch
from libs.common.db import mongo_client
from services.monitor.domain import ContainerMeta, Emit
from services.monitor.fakes import MemoryMonitorStore
from services.monitor.store import MongoMonitorStore, MonitorStore
from tests.support.stack import MONGO_URL

from .test_monitor_support import Sandbox, sandbox  # noqa: F401


async def test_monitor_publishes_and_exposes_samples_and_lifecycle_counters(
    sandbox: Sandbox, start_service, probe_factory  # noqa: F811
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

    labels = f'app="montest",host="{host}",ip="{ip}",machine_id="{machine}"'
    assert f"dockvm_container_memory_limit_bytes{{{labels}}} 1.34217728e+08" in exposition
    assert f"dockvm_container_cpu_quota_cpus{{{labels}}} 0.5" in exposition
    # Born at 0 with the container's first sample, so a first OOM kill is an increase.
    assert f"dockvm_container_oom_events_total{{{labels}}} 0.0" in exposition
    assert f"dockvm_container_restarts_total{{{labels}}} 0.0" in exposition
    assert died.host == host


# ------------------------------------------------------------ store contract

T0 = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture(params=["memory", "mongo"])
async def store(request, db_name: str) -> AsyncIterator[MonitorStore]:
    """The fake, or the real store on a fresh FerretDB database (dropped afterwards)."""
    client = mongo_client(MONGO_URL, app_name="dockvm-tests")
    s: MonitorStore = (
        MemoryMonitorStore() if request.param == "memory" else MongoMonitorStore(client[db_name])
    )
    await s.setup()
    yield s
    await client.drop_database(db_name)
    await client.close()


async def test_store_claims_a_lifecycle_event_until_it_is_published(store: MonitorStore):
    msg = ContainerStarted(machine_id="m", container_id="c", host="h", at=T0, ip="10.0.0.1")
    emit = Emit("e1", msg)
    first, again = await store.claim_event("h", emit), await store.claim_event("h", emit)
    await store.event_published(emit)
    assert (first, again, await store.claim_event("h", emit)) == (True, True, False)


async def test_store_replay_point_only_moves_forward(store: MonitorStore):
    await store.set_last_event_ns("h", 20)
    await store.set_last_event_ns("h", 10)
    assert (await store.last_event_ns("h"), await store.last_event_ns("other")) == (20, 0)


async def test_store_replay_point_is_zero_when_only_tracks_were_saved(store: MonitorStore):
    # A monitor that saved its tracker before handling any Docker event must still start again.
    await store.save_tracks("h", [])
    assert await store.last_event_ns("h") == 0


def test_meta_needs_the_machine_label():
    assert ContainerMeta.from_labels("c", {"dockvm.ip": "10.0.0.1"}) is None


async def test_store_gives_back_events_that_never_went_out(store: MonitorStore):
    msg = ContainerDied(machine_id="m", container_id="c", host="h", at=T0, ip="10.0.0.1",
                        exit_code=3)
    emit = Emit("e2", msg)
    await store.claim_event("h", emit)
    # A cutoff 1 s ahead: "older than 0 s" could miss a record made in the same millisecond.
    (pending,) = await store.unpublished("h", -1)
    await store.event_published(emit)
    assert (pending.id, pending.message) == ("e2", msg)
    assert await store.unpublished("h", -1) == []
