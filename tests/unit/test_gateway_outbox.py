"""The outbox relay's logic on the in-memory store, with a publisher that fails when told to."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libs.common.bus import MemoryPublisher
from libs.common.contracts import gateway as gw
from libs.common.contracts.envelope import Envelope, Message
from libs.common.errors import TransientError
from services.gateway.fakes import MemoryGatewayStore
from services.gateway.outbox import OutboxRelay, outbox_entry
from services.gateway.service import SagaDriver
from services.gateway.settings import GatewaySettings
from services.gateway.store import summary_of

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class FlakyPublisher(MemoryPublisher):
    """Records what it sends; the next ``fail`` publishes raise as a broker gone for good."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = 0

    async def publish(self, msg: Message, **kw) -> Envelope:
        if self.fail > 0:
            self.fail -= 1
            raise TransientError("broker gone")
        return await super().publish(msg, **kw)

    def ids(self, type_: str) -> list[str]:
        return [env.id for _, env in self.sent if env.type == type_]


class FlakyStore(MemoryGatewayStore):
    """The store twin whose next ``fail_clears`` clears raise."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_clears = 0

    async def clear_outbox(self, machine_id, entries) -> None:
        if self.fail_clears > 0:
            self.fail_clears -= 1
            raise TransientError("database gone")
        await super().clear_outbox(machine_id, entries)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _machine(mid: str, state: str = "running") -> dict:
    return {"_id": mid, "type": "docker", "app": "web", "image": "i", "cpus": 1.0,
            "memory": 100, "disk": 1000, "dc": "dc1", "vlan_id": 1, "hostname": mid,
            "state": state, "reason": None, "host": "h1", "ip": "10.0.0.5", "created_at": T0,
            "updated_at": T0, "transitions": [], "saga": None}


def _changed(mid: str, to: str) -> gw.MachineStateChanged:
    return gw.MachineStateChanged(machine_id=mid, app="web", from_state=None, to_state=to, at=T0)


@pytest.fixture
def pub() -> FlakyPublisher:
    return FlakyPublisher()


@pytest.fixture
async def store() -> FlakyStore:
    s = FlakyStore()
    await s.insert_machines([_machine("m1")])
    return s


@pytest.fixture
def driver(store, pub) -> SagaDriver:
    return SagaDriver(store, pub, GatewaySettings())


async def test_a_state_change_whose_publish_fails_keeps_its_event_and_last_op(driver, store, pub):
    _, op_id = await driver.begin_action("m1", "stop")
    pub.fail = 1
    await driver.lifecycle.on_action_done("m1", "stop")
    doc = await store.get("m1")

    assert (doc["state"], doc["last_op"]["id"], doc["last_op"]["ok"]) == ("stopped", op_id, True)
    assert await driver.wait_op("m1", op_id, 0) == doc["last_op"]
    assert [e["data"]["to_state"] for e in doc["outbox"]] == ["stopped"]
    assert pub.ids("machine.state_changed") == []
    assert driver.outbox.failed == {"m1"}


async def test_the_tick_publishes_what_failed_under_its_stored_id_once(driver, store, pub):
    await driver.begin_action("m1", "stop")
    pub.fail = 1
    await driver.lifecycle.on_action_done("m1", "stop")
    stored = [e["id"] for e in (await store.get("m1"))["outbox"]]
    await driver.outbox.tick()
    await driver.outbox.tick()

    assert pub.ids("machine.state_changed") == stored
    assert (await store.get("m1"))["outbox"] == []
    assert driver.outbox.failed == set()


async def test_events_of_one_machine_keep_their_order_across_a_failure(store, pub):
    relay = OutboxRelay(pub, store)
    entries = [outbox_entry(_changed("m1", s)) for s in ("stopped", "running", "stopped")]
    store.machines["m1"]["outbox"] = list(entries)
    pub.fail = 1
    first = await relay.flush("m1", entries[:1])
    # A later write's flush sees the earlier entry still there: it goes out first.
    second = await relay.flush("m1", entries)
    await relay.tick()

    assert (first, second) == (False, True)
    assert pub.ids("machine.state_changed") == [e["id"] for e in entries]
    assert store.machines["m1"]["outbox"] == []


async def test_a_failed_publish_stops_the_flush_so_nothing_overtakes_it(store, pub):
    relay = OutboxRelay(pub, store)
    entries = [outbox_entry(_changed("m1", s)) for s in ("stopped", "running")]
    store.machines["m1"]["outbox"] = list(entries)
    pub.fail = 1

    assert await relay.flush("m1", entries) is False
    assert pub.sent == []
    assert store.machines["m1"]["outbox"] == entries


async def test_a_failed_clear_is_retried_without_publishing_again(store, pub):
    relay = OutboxRelay(pub, store)
    entry = outbox_entry(_changed("m1", "stopped"))
    store.machines["m1"]["outbox"] = [entry]
    store.fail_clears = 1
    await relay.flush("m1", [entry])
    await relay.tick()
    left = list(store.machines["m1"]["outbox"])
    await relay.tick()

    assert left == [entry]
    assert pub.ids("machine.state_changed") == [entry["id"]]
    assert store.machines["m1"]["outbox"] == []


async def test_an_entry_no_model_knows_is_dropped_and_blocks_nothing(store, pub):
    relay = OutboxRelay(pub, store)
    unknown = {"id": "x1", "type": "machine.from_the_future", "version": 9, "data": {}}
    good = outbox_entry(_changed("m1", "stopped"))
    store.machines["m1"]["outbox"] = [unknown, good]

    assert await relay.flush("m1", [unknown, good]) is True
    await relay.tick()
    assert pub.ids("machine.state_changed") == [good["id"]]
    assert store.machines["m1"]["outbox"] == []


async def test_the_tick_scans_at_start_and_then_only_every_scan_period(store, pub):
    clock = Clock()
    relay = OutboxRelay(pub, store, scan_every_s=30, clock=clock)
    first = outbox_entry(_changed("m1", "stopped"))
    store.machines["m1"]["outbox"] = [first]
    at_start = await relay.tick()
    # A crash's leftover after the scan: not read again until the next scan is due.
    later = outbox_entry(_changed("m1", "running"))
    store.machines["m1"]["outbox"] = [later]
    before_due = await relay.tick()
    clock.t = 31
    when_due = await relay.tick()

    assert (at_start, before_due, when_due) == (1, 0, 1)
    assert pub.ids("machine.state_changed") == [first["id"], later["id"]]


async def test_the_clear_waits_for_the_tick_and_sends_nothing_twice(store, pub):
    relay = OutboxRelay(pub, store)
    entry = outbox_entry(_changed("m1", "stopped"))
    store.machines["m1"]["outbox"] = [entry]
    await relay.flush("m1", [entry])
    before_tick = list(store.machines["m1"]["outbox"])
    await relay.flush("m1", [entry])  # a later write returned it again: not sent twice
    await relay.tick()

    assert before_tick == [entry]
    assert pub.ids("machine.state_changed") == [entry["id"]]
    assert store.machines["m1"]["outbox"] == []


async def test_routing_key_and_data_survive_the_outbox(store, pub):
    relay = OutboxRelay(pub, store)
    msg = _changed("m1", "stopped")
    entry = outbox_entry(msg, routing_key="custom.key", id="fixed-id")
    await relay.flush("m1", [entry])
    [(key, env)] = pub.sent

    assert (key, env.id, env.parse()) == ("custom.key", "fixed-id", msg)


async def test_the_summary_never_carries_the_outbox(driver, store, pub):
    await driver.begin_action("m1", "stop")
    pub.fail = 1
    await driver.lifecycle.on_action_done("m1", "stop")

    assert store.machines["m1"]["outbox"]
    assert "outbox" not in store.summaries_by_id["m1"]
    assert "outbox" not in summary_of(store.machines["m1"])
