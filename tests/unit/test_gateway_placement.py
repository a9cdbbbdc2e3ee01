"""Placement of a batch on the in-memory store: one pass, one write per machine, fails whole."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

import pytest

from libs.common.bus import MemoryPublisher
from libs.common.contracts import ipam, provisioner
from services.gateway.domain import DcLoad, HostView, Res, place_all
from services.gateway.fakes import MemoryGatewayStore
from services.gateway.service import SagaDriver
from services.gateway.settings import GatewaySettings

GIB, MIB = 1 << 30, 1 << 20
T0 = datetime(2026, 1, 1, tzinfo=UTC)
# Each host takes 8 machines of 1 GiB (8 GiB of memory, no memory overcommit).
SPEC = {"type": "docker", "app": "web", "image": "img", "cpus": 0.05, "memory": GIB,
        "disk": 512 * MIB, "dc": "dc1", "vlan_id": 233}


class CountingStore(MemoryGatewayStore):
    """The in-memory store, counting the reads and writes placement makes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def load(self, dc):
        self.calls["load"] += 1
        return await super().load(dc)

    async def list_hosts(self):
        self.calls["list_hosts"] += 1
        return await super().list_hosts()

    async def transition(self, machine_id, *args, **kw):
        self.calls[f"transition {machine_id}"] += 1
        return await super().transition(machine_id, *args, **kw)

    async def update(self, machine_id, *args, **kw):
        self.calls[f"update {machine_id}"] += 1
        return await super().update(machine_id, *args, **kw)


@pytest.fixture
def pub() -> MemoryPublisher:
    return MemoryPublisher()


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
async def driver(store, pub) -> SagaDriver:
    d = SagaDriver(store, pub, GatewaySettings(), clock=lambda: T0)
    for host in ("h1", "h2", "h3"):
        await d.hosts.on_heartbeat(provisioner.HostHeartbeat(
            host_id=host, dc="dc1", version="t", at=T0,
            capacity=provisioner.Resources(cpus=2, memory=8 * GIB, disk=100 * GIB),
            allocated=provisioner.Resources(cpus=0, memory=0, disk=0)))
    return d


async def _batch(driver: SagaDriver, store: CountingStore, n: int, **over) -> list[str]:
    """Create ``n`` machines and hand them their IPs in one bulk answer."""
    ids = driver.new_ids(n)
    await driver.create({**SPEC, **over, "count": n}, ids)
    store.calls.clear()
    await driver.creates.on_ip_allocated_many([
        ipam.IpAllocated(machine_id=mid, ip=f"10.233.{1 + i // 250}.{i % 250 + 1}",
                         prefix_len=16, gateway="10.233.0.1", vlan_id=233, pool="p", dc="dc1")
        for i, mid in enumerate(ids)
    ])
    return ids


def _hosts(pub: MemoryPublisher) -> Counter[str]:
    return Counter(key.split(".")[1] for key, env in pub.sent if env.type == "container.create")


async def test_a_100_machine_batch_spreads_over_3_hosts_in_one_pass(driver, store, pub):
    ids = await _batch(driver, store, 100, memory=64 * MIB)
    docs = [await store.get(mid) for mid in ids]

    assert _hosts(pub) == {"h1": 34, "h2": 33, "h3": 33}
    assert (store.calls["load"], store.calls["list_hosts"]) == (1, 1)
    assert {store.calls[f"transition {mid}"] for mid in ids} == {1}
    assert not any(store.calls[f"update {mid}"] for mid in ids)
    assert {d["state"] for d in docs} == {"creating"}
    assert [t["state"] for t in docs[0]["transitions"]] == [
        "requested", "ip_assigned", "placed", "creating"]
    assert len({d["ip"] for d in docs}) == 100


async def test_a_batch_larger_than_a_host_spreads_over_the_dc(driver, store, pub):
    await _batch(driver, store, 20)

    assert _hosts(pub) == {"h1": 7, "h2": 7, "h3": 6}


async def test_a_batch_too_big_for_the_dc_fails_whole_and_releases_every_ip(driver, store, pub):
    ids = await _batch(driver, store, 25)  # the dc holds 24
    docs = [await store.get(mid) for mid in ids]

    assert {(d["state"], d["reason"]) for d in docs} == {("failed", "no_capacity")}
    assert _hosts(pub) == {}
    assert sorted(m.machine_id for m in pub.of_type("ip.release")) == sorted(ids)
    assert {store.calls[f"transition {mid}"] for mid in ids} == {1}
    assert {d["last_op"]["reason"] for d in docs} == {"no_capacity"}


async def test_a_batch_fits_next_to_what_the_dc_already_holds_or_fails(driver, store, pub):
    await _batch(driver, store, 20)
    pub.sent.clear()
    late = await _batch(driver, store, 5)  # 4 places left

    assert {(await store.get(mid))["state"] for mid in late} == {"failed"}
    assert _hosts(pub) == {}


async def test_a_duplicate_bulk_answer_changes_nothing(driver, store, pub):
    ids = await _batch(driver, store, 3)
    sent = len(pub.sent)
    await driver.creates.on_ip_allocated_many([
        ipam.IpAllocated(machine_id=mid, ip="10.233.9.9", prefix_len=16, gateway="10.233.0.1",
                         vlan_id=233, pool="p", dc="dc1") for mid in ids
    ])

    assert len(pub.sent) == sent


def test_place_all_returns_none_when_one_machine_does_not_fit():
    host = HostView("h1", "dc1", "online", Res(1.0, 4, 4), Res())
    need = Res(0.5, 1, 1)

    assert place_all([host], [("a", need)] * 2, "dc1", DcLoad()) == ["h1", "h1"]
    assert place_all([host], [("a", need)] * 3, "dc1", DcLoad()) is None
