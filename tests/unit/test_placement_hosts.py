"""Many hosts, decided in memory: spreading, bin-packing, overcommit, drained and dead hosts, a
batch that fits only over several hosts or not at all, the prewarm policy, and a host's death and
return as the gateway records and announces them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from libs.common.bus import MemoryPublisher
from libs.common.contracts import imagesync, ipam, provisioner
from libs.common.errors import ConflictError
from services.gateway.domain import DcLoad, HostView, Ratios, Res, place_all, place_prefix
from services.gateway.domain.prewarm import catch_up, split_ref, wanted
from services.gateway.fakes import MemoryGatewayStore
from services.gateway.handlers import MACHINE_EVENTS
from services.gateway.service import SagaDriver, host_views
from services.gateway.settings import GatewaySettings

GIB, MIB = 1 << 30, 1 << 20
T0 = datetime(2026, 1, 1, tzinfo=UTC)
# 4 GiB hosts: four 1 GiB machines each (memory is not overcommitted by default).
CAP = Res(16.0, 4 * GIB, 100 * GIB)
ONE = Res(0.5, GIB, GIB)
SPEC = {"type": "docker", "app": "web", "image": "127.0.0.1:5001/team/web:1", "cpus": 0.5,
        "memory": GIB, "disk": GIB, "dc": "dc1", "vlan_id": 233}


def _host(hid: str, status: str = "online", used: Res | None = None) -> HostView:
    return HostView(hid, "dc1", status, CAP, used or Res(), Ratios())


# ---- placement (pure) ------------------------------------------------------------------------


def test_an_apps_machines_spread_over_hosts_before_packing_one():
    hosts = [_host("h1"), _host("h2"), _host("h3")]

    assert sorted(place_all(hosts, [("web", ONE)] * 3, "dc1", DcLoad()) or []) == [
        "h1", "h2", "h3"]  # fmt: skip


def test_between_hosts_equal_for_the_app_the_fuller_one_is_packed():
    hosts = [_host("h1", used=Res(0, GIB, 0)), _host("h2", used=Res(0, 3 * GIB, 0))]

    assert place_all(hosts, [("db", ONE)], "dc1", DcLoad()) == ["h2"]


def test_a_batch_larger_than_a_host_spreads_and_fails_whole_only_past_the_dc():
    hosts = [_host("h1"), _host("h2")]

    spread = place_all(hosts, [("web", ONE)] * 8, "dc1", DcLoad())
    too_many = place_all(hosts, [("web", ONE)] * 9, "dc1", DcLoad())

    assert spread is not None and sorted(spread).count("h1") == 4 and spread.count("h2") == 4
    assert too_many is None
    assert len(place_prefix(hosts, [("web", ONE)] * 9, "dc1", DcLoad())) == 8


@pytest.mark.parametrize("status", ["down", "stale", "drained"])
def test_a_host_that_is_not_online_takes_nothing(status):
    hosts = [_host("h1", status=status), _host("h2")]

    assert place_all(hosts, [("web", ONE)] * 4, "dc1", DcLoad()) == ["h2"] * 4
    assert place_all(hosts, [("web", ONE)] * 5, "dc1", DcLoad()) is None


def test_overcommit_comes_from_settings_and_a_host_label_overrides_it():
    docs = [
        {"_id": h, "dc": "dc1", "last_seen": T0, "labels": labels,
         "capacity": {"cpus": 2.0, "memory": 4 * GIB, "disk": 100 * GIB}}
        for h, labels in (("h1", {}), ("h2", {"dockvm.overcommit.memory": "2"}))
    ]  # fmt: skip
    views = host_views(docs, {}, GatewaySettings(overcommit_cpu=0.5), T0)
    small = Res(0.25, 64 * MIB, GIB)

    assert [v.limit().cpus for v in views] == [1.0, 1.0]
    assert [v.limit().memory for v in views] == [4 * GIB, 8 * GIB]
    assert place_all(views, [("web", small)] * 8, "dc1", DcLoad()) is not None
    assert place_all(views, [("web", small)] * 9, "dc1", DcLoad()) is None


def test_host_views_mark_a_drained_live_host_drained_and_a_dead_one_down():
    docs = [{"_id": h, "dc": "dc1", "last_seen": T0 - timedelta(seconds=age), "capacity": {}}
            for h, age in (("h1", 0), ("h2", 120))]  # fmt: skip

    views = host_views(docs, {}, GatewaySettings(), T0, {"h1", "h2"})

    assert [v.status for v in views] == ["drained", "down"]


# ---- the prewarm policy (pure) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "split"),
    [
        ("127.0.0.1:5001/team/app:1", ("team/app", "1")),
        ("registry.example.com/app", ("app", "latest")),
        ("team/app:2@sha256:abc", ("team/app", "2")),
        ("localhost/app:3", ("app", "3")),
        ("dockvm/base:bookworm", ("dockvm/base", "bookworm")),
    ],
)
def test_a_reference_is_compared_without_its_registry(ref, split):
    assert split_ref(ref) == split


@pytest.mark.parametrize(
    ("policy", "ref", "expected"),
    [
        ("all", "127.0.0.1:5001/team/new:9", True),
        ("in-use", "127.0.0.1:5002/team/web:1", True),  # another dc's copy of a tag in use
        ("in-use", "127.0.0.1:5001/team/web:2", False),
        ("team/web", "127.0.0.1:5001/team/web:7", True),
        ("other/x,team/web:2", "127.0.0.1:5001/team/web:2", True),
        ("other/x,team/web:2", "127.0.0.1:5001/team/web:3", False),
    ],
)
def test_the_policy_decides_which_tags_are_prewarmed(policy, ref, expected):
    assert wanted(policy, ref, {"127.0.0.1:5001/team/web:1"}) is expected


def test_a_returning_host_catches_up_with_what_it_lacks_and_the_policy_wants():
    peers = ["127.0.0.1:5001/team/web:1", "127.0.0.1:5001/team/old:1", "dockvm/base:bookworm",
             "127.0.0.1:5001/team/db:<none>"]  # fmt: skip
    in_use = {"127.0.0.1:5001/team/web:1", "127.0.0.1:5001/team/api:3"}

    assert catch_up("in-use", peers, in_use, ["127.0.0.1:5001/team/api:3"]) == [
        "127.0.0.1:5001/team/web:1"]  # fmt: skip
    # A local-only tag is never asked for: it would be looked up on Docker Hub.
    assert catch_up("all", peers, in_use, []) == [
        "127.0.0.1:5001/team/api:3", "127.0.0.1:5001/team/old:1", "127.0.0.1:5001/team/web:1"]


# ---- the gateway on the in-memory store ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pub() -> MemoryPublisher:
    return MemoryPublisher()


@pytest.fixture
def store() -> MemoryGatewayStore:
    return MemoryGatewayStore()


def _beat(host: str, at: datetime, images: list[str] | None = None) -> provisioner.HostHeartbeat:
    return provisioner.HostHeartbeat(
        host_id=host, dc="dc1", version="t", at=at, images=images or [],
        capacity=provisioner.Resources(cpus=16, memory=4 * GIB, disk=100 * GIB),
        allocated=provisioner.Resources(cpus=0, memory=0, disk=0))  # fmt: skip


async def _driver(store, pub, clock, **settings) -> SagaDriver:
    d = SagaDriver(store, pub, GatewaySettings(**settings), clock=clock)
    for host in ("h1", "h2"):
        await d.hosts.on_heartbeat(_beat(host, clock()))
    pub.sent.clear()
    return d


@pytest.fixture
async def driver(store, pub, clock) -> SagaDriver:
    return await _driver(store, pub, clock)


async def _running(driver: SagaDriver, n: int, **over) -> list[str]:
    """``n`` machines placed and running, as the hosts placed them."""
    ids = driver.new_ids(n)
    await driver.create({**SPEC, **over, "count": n}, ids)
    await driver.creates.on_ip_allocated_many([
        ipam.IpAllocated(machine_id=mid, ip=f"10.233.1.{10 + i}", prefix_len=24,
                         gateway="10.233.1.1", vlan_id=233, pool="p", dc="dc1")
        for i, mid in enumerate(ids)
    ])  # fmt: skip
    for mid in ids:
        doc = await driver.store.get(mid)
        await driver.creates.on_created(mid, doc["host"], f"c-{mid}")
    return ids


def _keys(pub: MemoryPublisher, type_: str) -> list[str]:
    return [key for key, env in pub.sent if env.type == type_]


async def test_a_batch_the_dc_cannot_hold_is_refused_before_anything_is_stored(driver, store):
    await _running(driver, 6)  # two slots left over two hosts

    with pytest.raises(ConflictError) as refused:
        await driver.creates.check_fits({**SPEC}, 3)
    await driver.creates.check_fits({**SPEC}, 2)

    assert refused.value.reason == "no_capacity"
    assert "room for 2" in str(refused.value)
    assert len(store.machines) == 6


async def test_machines_not_placed_yet_count_against_the_room(driver, store):
    await driver.create({**SPEC, "count": 8}, driver.new_ids(8))  # waiting for their IPs

    with pytest.raises(ConflictError, match="room for 0"):
        await driver.creates.check_fits({**SPEC}, 1)


async def test_a_drained_host_takes_no_new_machine_and_undrain_resumes(driver, store):
    await store.drains.drain("h2", "ops", T0)
    first = await _running(driver, 3)
    with pytest.raises(ConflictError):
        await driver.creates.check_fits({**SPEC}, 2)
    await store.drains.undrain("h2")
    second = await _running(driver, 2)

    assert {(await store.get(m))["host"] for m in first} == {"h1"}
    assert {(await store.get(m))["host"] for m in second} == {"h2"}


@pytest.mark.parametrize(
    ("policy", "asked"),
    [("in-use", ["web:1"]), ("all", ["web:1", "new:1"]), ("team/new", ["new:1"])],
)
async def test_a_push_to_the_dcs_registry_prewarms_its_hosts_by_policy(
    store, pub, clock, policy, asked
):
    d = await _driver(store, pub, clock, prewarm_policy=policy)
    await _running(d, 1)
    pub.sent.clear()
    pushed = MACHINE_EVENTS[imagesync.ImagePushed]
    for repo in ("team/web", "team/new"):
        await pushed(d, imagesync.ImagePushed(
            registry="127.0.0.1:5001", dc="dc1", repo=repo, tag="1", digest="sha256:" + "a" * 64),
            None)  # fmt: skip
    await pushed(d, imagesync.ImagePushed(
        registry="127.0.0.1:5002", dc="dc2", repo="team/web", tag="1", digest="sha256:" + "b" * 64),
        None)  # fmt: skip

    refs = [m.ref for m in pub.of_type("image.prewarm")]
    assert refs == [f"127.0.0.1:5001/team/{a}" for a in asked for _ in ("h1", "h2")]
    assert set(_keys(pub, "image.prewarm")) == {"host.h1.image.prewarm", "host.h2.image.prewarm"}


async def test_a_dead_host_marks_its_machines_unknown_announced_and_back_running(
    driver, store, pub, clock
):
    ids = await _running(driver, 2)
    [on_h1] = [m for m in ids if (await store.get(m))["host"] == "h1"]
    ip = (await store.get(on_h1))["ip"]
    clock.t += timedelta(seconds=61)
    await driver.hosts.on_heartbeat(_beat("h2", clock()))  # h2 lives on
    pub.sent.clear()
    await driver.hosts.check_hosts()
    down = [(m.machine_id, m.from_state, m.to_state, m.reason)
            for m in pub.of_type("machine.state_changed")]  # fmt: skip
    hosts = {h["_id"]: h["status"] for h in await store.list_hosts()}
    pub.sent.clear()
    await driver.hosts.on_heartbeat(_beat("h1", clock(), images=[]))
    back = await store.get(on_h1)

    assert hosts == {"h1": "down", "h2": "online"}
    assert down == [(on_h1, "running", "unreachable", "host_down")]
    assert (back["state"], back["ip"], back["host"]) == ("running", ip, "h1")
    assert [(m.to_state, m.reason) for m in pub.of_type("machine.state_changed")] == [
        ("running", "host_back")]
    # Back from down, it catches up with the image its machines use.
    assert [(k, m.ref) for k, m in zip(_keys(pub, "image.prewarm"), pub.of_type("image.prewarm"),
                                       strict=True)] == [("host.h1.image.prewarm", SPEC["image"])]
