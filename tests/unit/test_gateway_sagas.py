"""The saga driver on the in-memory store, publisher and clock: steps, timeouts, compensation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from libs.common.bus import MemoryPublisher
from libs.common.contracts import ipam, provisioner
from services.gateway.fakes import MemoryGatewayStore
from services.gateway.service import SagaDriver, StepSpec
from services.gateway.settings import GatewaySettings
from services.gateway.writes import WriteSignal

GIB = 1 << 30
SPEC = {"type": "docker", "app": "web", "image": "img", "cpus": 1.0, "memory": GIB,
        "disk": GIB, "dc": "dc1", "vlan_id": 233, "count": 1}


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.t = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pub() -> MemoryPublisher:
    return MemoryPublisher()


@pytest.fixture
def store() -> MemoryGatewayStore:
    return MemoryGatewayStore()


@pytest.fixture
async def driver(store, pub, clock) -> SagaDriver:
    d = SagaDriver(store, pub, GatewaySettings(step_attempts=2), clock=clock)
    for host in ("h1", "h2"):
        await d.hosts.on_heartbeat(provisioner.HostHeartbeat(
            host_id=host, dc="dc1", version="t", at=clock(),
            capacity=provisioner.Resources(cpus=2, memory=8 * GIB, disk=100 * GIB),
            allocated=provisioner.Resources(cpus=0, memory=0, disk=0)))
    return d


def _allocated(mid: str, ip: str = "10.233.1.10") -> ipam.IpAllocated:
    return ipam.IpAllocated(machine_id=mid, ip=ip, prefix_len=24, gateway="10.233.1.1",
                            vlan_id=233, pool="p", dc="dc1")


def _keys(pub: MemoryPublisher, type_: str) -> list[str]:
    return [key for key, env in pub.sent if env.type == type_]


async def _create(driver: SagaDriver, n: int = 1, **over) -> list[str]:
    ids = driver.new_ids(n)
    await driver.create({**SPEC, **over}, ids)
    return ids


async def test_create_walks_every_step_to_running(driver, store, pub):
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    [host] = [k.split(".")[1] for k in _keys(pub, "container.create")]
    await driver.creates.on_created(mid, host, "c1")
    doc = await store.get(mid)

    assert [t["state"] for t in doc["transitions"]] == [
        "requested", "ip_assigned", "placed", "creating", "running"]
    assert doc["saga"] is None
    assert _keys(pub, "ip.allocate") == ["ip.allocate"]
    assert _keys(pub, "container.create") == [f"host.{host}.container.create"]


async def test_the_app_is_spread_then_packed(driver, pub):
    ids = await _create(driver, 3)
    for i, mid in enumerate(ids):
        await driver.creates.on_ip_allocated(_allocated(mid, f"10.233.1.{10 + i}"))

    assert [k.split(".")[1] for k in _keys(pub, "container.create")] == ["h1", "h2", "h1"]


async def test_no_capacity_fails_and_releases_the_ip(driver, store, pub):
    [mid] = await _create(driver, cpus=9.0)  # 2 cpus x 4 overcommit = 8
    await driver.creates.on_ip_allocated(_allocated(mid))
    doc = await store.get(mid)

    assert (doc["state"], doc["reason"]) == ("failed", "no_capacity")
    assert [m.machine_id for m in pub.of_type("ip.release")] == [mid]
    assert _keys(pub, "container.create") == []


async def test_duplicate_events_change_nothing(driver, store, pub):
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_created(mid, "h1", "c1")
    await driver.creates.on_created(mid, "h1", "c1")

    assert len(_keys(pub, "container.create")) == 1
    assert [t["state"] for t in (await store.get(mid))["transitions"]][-1:] == ["running"]


async def test_a_silent_step_is_resent_then_failed_with_compensation(driver, store, pub, clock):
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    clock.advance(121)
    await driver.tick()  # attempt 2: re-sent
    clock.advance(121)
    await driver.tick()  # attempts exhausted: failed, partial container removed
    await driver.lifecycle.on_destroyed(mid)
    await driver.lifecycle.on_ip_released(mid)
    doc = await store.get(mid)

    assert len(_keys(pub, "container.create")) == 2
    assert doc["state"] == "failed" and doc["reason"].startswith("timeout")
    assert [m.machine_id for m in pub.of_type("container.destroy")] == [mid]
    assert [m.machine_id for m in pub.of_type("ip.release")] == [mid]
    assert (doc["saga"], doc["ip_released"]) == (None, True)


async def test_a_late_allocation_after_giving_up_is_released(driver, store, pub, clock):
    [mid] = await _create(driver)
    clock.advance(11)
    await driver.tick()
    clock.advance(11)
    await driver.tick()
    await driver.creates.on_ip_allocated(_allocated(mid))

    assert (await store.get(mid))["state"] == "failed"
    assert [m.machine_id for m in pub.of_type("ip.release")] == [mid, mid]


async def test_a_create_that_lands_after_failure_is_destroyed(driver, store, pub):
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_create_failed(mid, "network_unavailable")
    await driver.creates.on_created(mid, "h2", "c9")

    assert (await store.get(mid))["state"] == "failed"
    assert _keys(pub, "container.destroy") == ["host.h2.container.destroy"]


async def test_resume_resends_every_step_in_flight(driver, store, pub):
    ids = await _create(driver, 2)
    await driver.creates.on_ip_allocated(_allocated(ids[0]))
    pub.sent.clear()
    resumed = await driver.resume()

    assert resumed == 2
    assert sorted(env.type for _, env in pub.sent) == ["container.create", "ip.allocate"]


async def test_resize_refused_returns_to_running_with_the_reason(driver, store):
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_created(mid, "h1", "c1")
    _, op_id = await driver.begin_resize(mid, None, GIB // 2, None, False)
    await driver.lifecycle.on_resize_failed(mid, "memory_below_usage", "uses 900m")
    doc = await store.get(mid)

    assert (doc["state"], doc["memory"]) == ("running", GIB)
    assert doc["last_op"]["id"] == op_id
    assert (doc["last_op"]["ok"], doc["last_op"]["reason"]) == (False, "memory_below_usage")


async def test_destroy_removes_the_container_then_releases_the_ip(driver, store, pub):
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_created(mid, "h1", "c1")
    await driver.begin_destroy(mid)
    await driver.lifecycle.on_ip_released(mid)  # out of order: ignored until the container is gone
    await driver.lifecycle.on_destroyed(mid)
    await driver.lifecycle.on_ip_released(mid)

    assert (await store.get(mid))["state"] == "destroyed"
    assert _keys(pub, "container.destroy") == ["host.h1.container.destroy"]
    assert [m.machine_id for m in pub.of_type("ip.release")] == [mid]


async def test_a_host_that_goes_down_marks_its_machines_unknown_then_back(driver, store, clock):
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_created(mid, "h1", "c1")
    clock.advance(61)
    await driver.hosts.check_hosts()
    down = (await store.get(mid))["state"]
    await driver.hosts.on_heartbeat(provisioner.HostHeartbeat(
        host_id="h1", dc="dc1", version="t", at=clock(),
        capacity=provisioner.Resources(cpus=2, memory=8 * GIB, disk=100 * GIB),
        allocated=provisioner.Resources(cpus=1, memory=GIB, disk=GIB)))

    assert down == "unreachable"
    assert (await store.get(mid))["state"] == "running"


async def test_kvm_machines_skip_placement_and_use_the_kvm_channel(driver, pub):
    [mid] = await _create(driver, type="kvm")
    await driver.creates.on_ip_allocated(_allocated(mid))

    assert _keys(pub, "kvm.machine.create") == ["kvm.machine.create"]
    assert _keys(pub, "container.create") == []


async def test_hosts_are_told_which_machines_we_know_for_orphan_cleanup(driver, pub):
    ids = await _create(driver, 2)
    for i, mid in enumerate(ids):
        await driver.creates.on_ip_allocated(_allocated(mid, f"10.233.1.{10 + i}"))
        await driver.creates.on_created(mid, None, f"c{i}")
    await driver.hosts.announce_known()
    unidentified = [env for _, env in pub.sent if env.type == "machines.known"]
    driver.hosts.cluster_id = "c1"
    await driver.hosts.announce_known()
    sent = [(key, env.parse()) for key, env in pub.sent if env.type == "machines.known"]
    known = {key: m.machine_ids for key, m in sent}

    assert unidentified == []  # agents ignore a list without the cluster id: none is sent
    assert known == {"host.h1.machines.known": [ids[0]], "host.h2.machines.known": [ids[1]]}
    assert {m.cluster_id for _, m in sent} == {"c1"}


async def test_a_replicated_image_is_prewarmed_on_the_dc_hosts(driver, pub):
    asked = await driver.hosts.prewarm("dc1", "127.0.0.1:5001/team/app:1")

    assert asked == 2
    assert _keys(pub, "image.prewarm") == ["host.h1.image.prewarm", "host.h2.image.prewarm"]


@pytest.mark.parametrize(
    ("kind", "state"), [("died", "stopped"), ("oom_killed", "stopped"), ("started", "running")]
)
async def test_monitor_lifecycle_events_update_an_idle_machine(driver, store, kind, state):
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_created(mid, "h1", "c1")
    await driver.lifecycle.on_lifecycle(mid, "died")
    await driver.lifecycle.on_lifecycle(mid, kind, kind)

    assert (await store.get(mid))["state"] == state


async def _running(driver: SagaDriver) -> str:
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_created(mid, "h1", "c1")
    return mid


def _deploy_steps(driver: SagaDriver, sent: list[tuple[str, str]]) -> None:
    for step in ("fetch", "restart"):
        async def send(doc, step=step) -> None:
            sent.append((doc["_id"], step))

        driver.register_step("deploy", step, StepSpec(send=send, timeout_s=30))


async def test_a_registered_operation_runs_its_steps_and_returns_to_its_state(driver, store):
    sent: list[tuple[str, str]] = []
    _deploy_steps(driver, sent)
    mid = await _running(driver)
    await driver.begin(mid, "deploy", "fetch", ["running"], "deploying", version="1.2")
    during = (await store.get(mid))["state"]
    await driver.advance(mid, "deploy", "fetch", "restart")
    await driver.advance(mid, "deploy", "fetch", "restart")  # a duplicate result: no-op
    await driver.advance(mid, "deploy", "restart", None)
    doc = await store.get(mid)

    assert sent == [(mid, "fetch"), (mid, "restart")]
    assert (during, doc["state"], doc["saga"]) == ("deploying", "running", None)
    assert doc["last_op"]["ok"] is True


async def test_a_registered_step_is_resent_then_timed_out(driver, store, clock):
    sent: list[tuple[str, str]] = []
    _deploy_steps(driver, sent)
    mid = await _running(driver)
    await driver.begin(mid, "deploy", "fetch", ["running"], "deploying")
    clock.advance(31)
    await driver.tick()
    clock.advance(31)
    await driver.tick()
    doc = await store.get(mid)

    assert sent == [(mid, "fetch"), (mid, "fetch")]
    assert (doc["state"], doc["saga"], doc["last_op"]["ok"]) == ("running", None, False)


async def test_a_bulk_create_asks_ipam_once_and_places_the_batch(driver, store, pub):
    ids = await _create(driver, 3)
    [bulk] = pub.of_type("ip.allocate_many")
    await driver.creates.on_ip_allocated_many(
        [_allocated(mid, f"10.233.1.{10 + i}") for i, mid in enumerate(ids)])

    assert (bulk.request_id, bulk.machine_ids) == (f"r-{ids[0]}", ids)
    assert pub.of_type("ip.allocate") == []
    assert [k.split(".")[1] for k in _keys(pub, "container.create")] == ["h1", "h2", "h1"]
    assert {(await store.get(mid))["state"] for mid in ids} == {"creating"}


async def test_a_failed_bulk_allocation_fails_every_machine_of_the_request(driver, store):
    ids = await _create(driver, 2)
    await driver.creates.on_ip_failed(ipam.IpAllocationFailed(
        request_id=f"r-{ids[0]}", reason="pool_exhausted"))

    assert [(await store.get(mid))["reason"] for mid in ids] == ["pool_exhausted"] * 2


async def test_destroying_a_failed_machine_whose_ip_was_released_ends_without_ipam(
    driver, store, pub
):
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_create_failed(mid, "image_missing")
    await driver.lifecycle.on_ip_released(mid)
    await driver.begin_destroy(mid)
    await driver.lifecycle.on_destroyed(mid)

    assert (await store.get(mid))["state"] == "destroyed"
    assert len(pub.of_type("ip.release")) == 1


class _CountedReads(MemoryGatewayStore):
    """The in-memory store, counting the reads of many machines made by one task (the waiter;
    the create saga reads them too)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.first_read = asyncio.Event()
        self.counted: asyncio.Task | None = None

    async def by_ids(self, ids):
        if asyncio.current_task() is self.counted:
            self.reads += 1
            self.first_read.set()
        return await super().by_ids(ids)


async def _to_running(driver: SagaDriver, mid: str, n: int) -> None:
    await driver.creates.on_ip_allocated(_allocated(mid, f"10.233.1.{10 + n}"))
    doc = await driver.store.get(mid)
    await driver.creates.on_created(mid, doc["host"], f"c{n}")


async def test_a_create_waiter_wakes_on_this_gateways_writes_not_by_polling(pub, clock):
    store = _CountedReads()
    driver = SagaDriver(store, pub, GatewaySettings(), clock=clock)
    await driver.hosts.on_heartbeat(provisioner.HostHeartbeat(
        host_id="h1", dc="dc1", version="t", at=clock(),
        capacity=provisioner.Resources(cpus=8, memory=8 * GIB, disk=100 * GIB),
        allocated=provisioner.Resources(cpus=0, memory=0, disk=0)))  # fmt: skip
    ids = await _create(driver, 3)
    waiter = store.counted = asyncio.create_task(driver.wait_terminal(ids, 30))
    await store.first_read.wait()

    for n, mid in enumerate(ids):  # a machine every 0.25 s: a 0.2 s poll would read 4 times
        await asyncio.sleep(0.25)
        await _to_running(driver, mid, n)
    docs = await asyncio.wait_for(waiter, 10)

    assert [d["state"] for d in docs] == ["running"] * 3
    # The first look, the one that confirms, and at most one recheck for other replicas.
    assert store.reads <= 3


class _Deaf(WriteSignal):
    """Writes that wake nobody here: another replica's."""

    def wrote(self) -> None:
        pass


async def test_a_create_waiter_sees_another_replicas_writes_with_the_index_reload(pub, clock):
    store = _CountedReads()
    store.writes = _Deaf()
    reloaded = False
    own = MemoryGatewayStore.written.__get__(store)
    store.written = lambda mid: own(mid) if reloaded else None  # type: ignore[method-assign]
    driver = SagaDriver(store, pub, GatewaySettings(), clock=clock)
    await driver.hosts.on_heartbeat(provisioner.HostHeartbeat(
        host_id="h1", dc="dc1", version="t", at=clock(),
        capacity=provisioner.Resources(cpus=8, memory=8 * GIB, disk=100 * GIB),
        allocated=provisioner.Resources(cpus=0, memory=0, disk=0)))  # fmt: skip
    [mid] = await _create(driver, 1)
    waiter = store.counted = asyncio.create_task(driver.wait_terminal([mid], 30))
    await store.first_read.wait()

    await _to_running(driver, mid, 1)
    reloaded = True  # the listing index's reload brings the other replica's write
    [doc] = await asyncio.wait_for(waiter, 10)

    assert doc["state"] == "running"
    assert store.reads == 2  # the first look and the confirmation, not a poll
