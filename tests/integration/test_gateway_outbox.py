"""The transactional outbox on the real RabbitMQ and the real MongoDB API (FerretDB v1).

A state change and its event cannot part: a publish that fails for good (the broker connection
dropped between the write and the publish) or a crash between the two leaves the event in the
document's outbox, the relay publishes it later under its stored id, a consumer that dedupes
handles it once, and a ``?wait`` caller (``wait_op``) sees the end state meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from libs.common.bus import (
    AmqpPublisher,
    Claim,
    Consumer,
    MessageContext,
    MongoDedupe,
    QueueSpec,
    connect,
)
from libs.common.bus.topology import host_key
from libs.common.clock import utcnow
from libs.common.contracts import ipam, provisioner
from libs.common.contracts.releases import (
    DeploySucceeded,
    HealthCheck,
    ReleaseRequested,
    ReleaseSucceeded,
)
from libs.common.errors import TransientError
from services.gateway.outbox import OutboxRelay, outbox_entry
from services.gateway.service import Releases, ReleaseStore, SagaDriver
from services.gateway.settings import GatewaySettings
from services.gateway.store import GatewayStore
from tests.support.proxy import TcpProxy
from tests.support.stack import AMQP_HOST, AMQP_PORT

T0 = datetime(2026, 1, 1, tzinfo=UTC)
GIB = 1 << 30


class DroppingProxy(TcpProxy):
    """A proxy in front of RabbitMQ that can go away (refusing reconnects) and come back."""

    async def drop(self) -> None:
        """Drop every connection and refuse new ones."""
        await self.close()

    async def restore(self) -> None:
        """Accept connections again on the same port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)


class CutAfterWrite(GatewayStore):
    """The real store; ``after_write`` runs once, right after the next state change is written
    (between the write and the publish of its events)."""

    after_write: Callable[[], Awaitable[None]] | None = None

    async def transition(self, *args: Any, **kw: Any):
        doc = await super().transition(*args, **kw)
        hook, self.after_write = self.after_write, None
        if doc is not None and hook is not None:
            await hook()
        return doc


class NoImmediatePublish(OutboxRelay):
    """A relay whose process dies right after each write: the immediate publish never runs."""

    async def flush(self, doc_id, entries) -> bool:
        return False


class FailType:
    """A publisher that fails for good for the first ``times`` messages of ``type_``."""

    def __init__(self, inner: AmqpPublisher, type_: str, times: int = 1) -> None:
        self.inner, self.type_, self.times = inner, type_, times

    async def publish(self, msg, **kw):
        if msg.TYPE == self.type_ and self.times > 0:
            self.times -= 1
            raise TransientError("publish failed for good")
        return await self.inner.publish(msg, **kw)


class CountingDedupe(MongoDedupe):
    """The Mongo dedupe, remembering each claim's outcome."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.outcomes: list[Claim] = []

    async def claim(self, message_id: str) -> Claim:
        outcome = await super().claim(message_id)
        self.outcomes.append(outcome)
        return outcome


class Handled:
    """A real consumer (with the Mongo dedupe) of the given events: what it handled, by id."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.messages: list[Any] = []
        self.changed = asyncio.Event()
        self.dedupe: CountingDedupe | None = None

    async def duplicate_seen(self, timeout: float = 30.0) -> None:
        """Wait until the consumer skipped a message as already handled."""
        assert self.dedupe is not None
        async with asyncio.timeout(timeout):
            while Claim.DONE not in self.dedupe.outcomes:
                await asyncio.sleep(0.05)

    async def handle(self, msg: Any, ctx: MessageContext) -> None:
        self.ids.append(ctx.envelope.id)
        self.messages.append(msg)
        self.changed.set()

    async def wait(self, count: int, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while len(set(self.ids)) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def handled(amqp, publisher, mongo_db):
    """A deduping consumer of machine.state_changed and release.* on the test's vhost."""
    seen = Handled()
    seen.dedupe = CountingDedupe(mongo_db["processed"], "outbox-watcher")
    channel = await amqp.channel()
    types = ("machine.state_changed", "release.succeeded", "release.failed")
    consumer = Consumer(
        channel,
        QueueSpec("outbox-watcher", types),
        dict.fromkeys(types, seen.handle),
        publisher,
        dedupe=seen.dedupe,
    )
    await consumer.start()
    yield seen
    await consumer.stop()


@pytest.fixture
async def proxy():
    p = await DroppingProxy(AMQP_HOST, AMQP_PORT).start()
    yield p
    await p.close()


def _machine(mid: str, state: str = "running") -> dict:
    return {"_id": mid, "type": "docker", "app": "web", "image": "i", "cpus": 1.0,
            "memory": GIB, "disk": GIB, "dc": "dc1", "vlan_id": 1, "hostname": mid,
            "state": state, "reason": None, "host": "h1", "ip": "10.0.0.5", "created_at": T0,
            "updated_at": T0, "transitions": [], "saga": None}


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


async def _outbox(store: GatewayStore | ReleaseStore, doc_id: str) -> list[dict]:
    doc = await store.get(doc_id) if isinstance(store, GatewayStore) else await store.plan(doc_id)
    return (doc or {}).get("outbox") or []


async def test_a_broker_drop_between_write_and_publish_loses_neither_event_nor_wait(
    mongo_db, vhost, proxy, handled, probe_factory
):
    probe = await probe_factory("machine.state_changed")
    store = CutAfterWrite(mongo_db)
    await store.setup()
    await store.insert_machines([_machine("m1")])
    connection = await connect(vhost.url_via("127.0.0.1", proxy.port), name="gateway-under-test")
    gateway_pub = AmqpPublisher(connection, source="gateway")
    driver = SagaDriver(store, gateway_pub, GatewaySettings())
    try:
        _, op_id = await driver.begin_action("m1", "stop")
        waiter = asyncio.create_task(driver.wait_op("m1", op_id, 30))  # a ?wait caller
        store.after_write = proxy.drop
        await driver.lifecycle.on_action_done("m1", "stop")  # the publish fails: no raise
        last = await waiter
        left = await _outbox(store, "m1")
        failed = driver.outbox.failed
        await proxy.restore()  # the robust connection comes back on its own
        await _until(lambda: _ticked_empty(driver.outbox, store, "m1"))
        await handled.wait(1)
        doc = await store.get("m1")
    finally:
        await gateway_pub.close()
        await connection.close()

    assert (last["id"], last["ok"], doc["state"]) == (op_id, True, "stopped")
    assert [e["data"]["to_state"] for e in left] == ["stopped"]
    assert failed == {"m1"}
    assert Counter(handled.ids) == {left[0]["id"]: 1}
    assert [(m.from_state, m.to_state) for m in handled.messages] == [("running", "stopped")]
    assert {env.id for _, env in probe.received} == {left[0]["id"]}
    assert doc["outbox"] == []


async def _ticked_empty(relay: OutboxRelay, store: GatewayStore, mid: str) -> bool:
    await relay.tick()
    return not await _outbox(store, mid)


async def test_a_crash_between_write_and_publish_is_healed_by_the_next_start(
    mongo_db, publisher, handled, probe_factory
):
    probe = await probe_factory("machine.state_changed")
    store = GatewayStore(mongo_db)
    await store.setup()
    await store.insert_machines([_machine("m1"), _machine("m2")])
    crashed = SagaDriver(
        store, publisher, GatewaySettings(), outbox=NoImmediatePublish(publisher, store)
    )
    _, op1 = await crashed.begin_action("m1", "restart")
    await crashed.lifecycle.on_action_done("m1", "restart")
    await crashed.begin_destroy("m2")
    await crashed.lifecycle.on_destroyed("m2")
    await crashed.lifecycle.on_ip_released("m2")
    left = {m: [e["id"] for e in await _outbox(store, m)] for m in ("m1", "m2")}
    sent_before = len(probe.received)
    restarted = OutboxRelay(publisher, store, scan_every_s=0)  # a new gateway process
    flushed = await restarted.tick()
    again = await restarted.tick()  # nothing is left to send twice
    await handled.wait(3)
    # The probe sees the order they went out in (the consumer handles them side by side).
    raw = await probe.wait_for("machine.state_changed", count=3)
    m1, m2 = await store.get("m1"), await store.get("m2")

    assert (m1["last_op"]["id"], m1["last_op"]["ok"]) == (op1, True)
    assert (len(left["m1"]), len(left["m2"]), sent_before) == (1, 2, 0)
    assert (flushed, again) == (2, 0)
    assert Counter(handled.ids) == dict.fromkeys(left["m1"] + left["m2"], 1)
    assert [m.to_state for m in raw if m.machine_id == "m2"] == ["destroying", "destroyed"]
    assert (m1["outbox"], m2["outbox"]) == ([], [])


async def test_a_create_announces_every_state_in_order_from_the_outbox(
    mongo_db, publisher, probe_factory
):
    probe = await probe_factory("machine.state_changed")
    store = GatewayStore(mongo_db)
    await store.setup()
    driver = SagaDriver(store, publisher, GatewaySettings())
    await driver.hosts.on_heartbeat(provisioner.HostHeartbeat(
        host_id="h1", dc="dc1", version="t", at=utcnow(),
        capacity=provisioner.Resources(cpus=4, memory=8 * GIB, disk=100 * GIB),
        allocated=provisioner.Resources(cpus=0, memory=0, disk=0)))
    [mid] = driver.new_ids(1)
    spec = {"type": "docker", "app": "web", "image": "img", "cpus": 1.0, "memory": GIB,
            "disk": GIB, "dc": "dc1", "vlan_id": 233, "count": 1}
    await driver.create(spec, [mid])
    await driver.creates.on_ip_allocated(ipam.IpAllocated(
        machine_id=mid, ip="10.233.1.10", prefix_len=24, gateway="10.233.1.1", vlan_id=233,
        pool="p", dc="dc1"))
    await driver.creates.on_created(mid, "h1", "c1")
    got = await probe.wait_for("machine.state_changed", count=4)
    await driver.outbox.tick()
    doc = await store.get(mid)
    summary = await store.summaries_coll.find_one({"_id": mid})

    assert [(m.from_state, m.to_state) for m in got] == [
        ("requested", "ip_assigned"), ("ip_assigned", "placed"), ("placed", "creating"),
        ("creating", "running")]
    assert [(m.host, str(m.ip)) for m in got][-1] == ("h1", "10.233.1.10")
    assert len({env.id for _, env in probe.received}) == 4
    assert (doc["state"], doc["outbox"]) == ("running", [])
    assert "outbox" not in summary


async def test_the_clear_loses_no_concurrent_write_on_ferretdb(mongo_db, publisher):
    """FerretDB v1 rewrites whole documents: an unlocked clear would erase concurrent writes."""
    store = GatewayStore(mongo_db)
    await store.setup()
    await store.insert_machines([_machine("m1")])
    driver = SagaDriver(store, FailType(publisher, "machine.state_changed", times=1),
                        GatewaySettings())
    await driver.begin_action("m1", "stop")
    await driver.lifecycle.on_action_done("m1", "stop")
    await asyncio.gather(
        driver.outbox.tick(),
        *(store.update("m1", {}, {f"note{i}": i}) for i in range(8)),
    )
    doc = await store.get("m1")
    summaries = await store.summaries({}, 10)

    assert [doc.get(f"note{i}") for i in range(8)] == list(range(8))
    assert (doc["state"], doc["outbox"]) == ("stopped", [])
    assert all("outbox" not in s for s in summaries)


async def test_a_release_end_whose_publish_fails_is_sent_by_the_relay_once(
    mongo_db, publisher, handled
):
    store = ReleaseStore(mongo_db)
    await store.setup()
    machines = [{"_id": "m1", "type": "docker", "host": "h1", "ip": "10.9.0.11"}]

    class Directory:
        async def app_exists(self, app: str) -> bool:
            return True

        async def running(self, app: str) -> list[dict]:
            return machines

    releases = Releases(store, FailType(publisher, "release.succeeded"), Directory())
    req = ReleaseRequested(
        release_id="r1", app="demo", group_id="com.example", artifact_id="demo-app",
        version="2.0.0", batch_size=1, health_check=HealthCheck(type="http", target="8000/"))
    await releases.request(req, requested_by="release-bot")
    await releases.on_result(DeploySucceeded(release_id="r1", machine_id="m1", host="h1",
                                             version="2.0.0"))
    left = await _outbox(store, "r1")
    status = (await store.plan("r1"))["status"]
    await _until(lambda: _release_ticked_empty(releases.outbox, store))
    await handled.wait(1)

    assert ([e["id"] for e in left], status) == (["r1/end"], "succeeded")
    assert Counter(handled.ids) == {"r1/end": 1}
    assert [(m.release_id, m.machines) for m in handled.messages] == [("r1", 1)]


async def _release_ticked_empty(relay: OutboxRelay, store: ReleaseStore) -> bool:
    await relay.tick()
    return not await _outbox(store, "r1")


async def test_an_end_sent_twice_reaches_a_deduping_consumer_once(
    mongo_db, publisher, handled, probe_factory
):
    """A repair racing a slow winner writes the end twice, and two processes' relays each send
    what they read: the same id, so a consumer that dedupes handles it once."""
    probe = await probe_factory("release.#")
    store = ReleaseStore(mongo_db)
    await store.coll.insert_one({"_id": "r2", "status": "running"})
    end = ReleaseSucceeded(release_id="r2", app="demo", version="2.0.0", machines=1)
    entry = outbox_entry(end, id="r2/end")
    await store.update("r2", {"status": "succeeded"}, outbox=[entry])
    written = await store.update("r2", {"status": "succeeded"}, outbox=[entry])
    relay = OutboxRelay(publisher, store, name="releases")
    await relay.flush("r2", written["outbox"])
    await OutboxRelay(publisher, store, name="releases").flush("r2", written["outbox"])
    await relay.tick()
    raw = await probe.wait_for("release.succeeded", count=2)
    await handled.wait(1)
    await handled.duplicate_seen()

    assert len(written["outbox"]) == 2
    assert len(raw) == 2
    assert {env.id for _, env in probe.received} == {"r2/end"}
    assert Counter(handled.ids) == {"r2/end": 1}
    assert await _outbox(store, "r2") == []


async def test_a_step_in_flight_is_sent_again_when_the_bus_comes_back(
    mongo_db, vhost, proxy, probe_factory
):
    """A command lost with a broker connection (sent as it dropped, or its answer lost) is sent
    again when the connection is back, not after the step's timeout (here 10 minutes)."""
    from libs.common.runner import ServiceContext

    probe = await probe_factory(host_key("h1", "container.stop"))
    store = GatewayStore(mongo_db)
    await store.setup()
    await store.insert_machines([_machine("m1")])
    connection = await connect(vhost.url_via("127.0.0.1", proxy.port), name="gateway-under-test")
    gateway_pub = AmqpPublisher(connection, source="gateway")
    driver = SagaDriver(store, gateway_pub, GatewaySettings(action_step_timeout_s=600))
    ctx = ServiceContext("gateway", GatewaySettings(), connection, gateway_pub,
                         None, None, None, None)  # type: ignore[arg-type]
    ctx.on_reconnect(driver.resume, "saga-resume")
    try:
        await driver.begin_action("m1", "stop")
        first = await probe.wait_for("container.stop")
        await proxy.cut()  # the command is taken as lost; the connection comes back at once
        again = await probe.wait_for("container.stop", count=2)
        await asyncio.gather(*ctx.tasks)
        doc = await store.get("m1")
    finally:
        await gateway_pub.close()
        await connection.close()

    assert [m.machine_id for m in first] == ["m1"]
    assert [m.machine_id for m in again] == ["m1", "m1"]
    assert (doc["saga"]["op"], doc["saga"]["attempt"]) == ("stop", 1)  # a re-send, not a retry
