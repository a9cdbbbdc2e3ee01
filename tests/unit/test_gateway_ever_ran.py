"""A machine's IP is released with ``ever_ran``: false only when it never reached running."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libs.common.bus import MemoryPublisher
from libs.common.contracts import ipam, provisioner
from services.gateway.fakes import MemoryGatewayStore
from services.gateway.service import SagaDriver
from services.gateway.service.lifecycle import ever_ran
from services.gateway.settings import GatewaySettings

GIB = 1 << 30
T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPEC = {"type": "docker", "app": "web", "image": "img", "cpus": 1.0, "memory": GIB,
        "disk": GIB, "dc": "dc1", "vlan_id": 233, "count": 1}  # fmt: skip


def _path(*states: str) -> dict:
    return {"transitions": [{"state": s, "at": T0, "reason": None} for s in states]}


@pytest.mark.parametrize(
    ("doc", "ran"),
    [
        (_path("requested", "ip_assigned", "placed", "creating", "failed"), False),
        (_path("requested", "ip_assigned", "failed", "destroying", "destroyed"), False),
        (_path("requested", "ip_assigned", "placed", "creating", "running", "destroying"), True),
        # Its running transition trimmed away (the cap), a later state still says it ran.
        (_path("requested", "stopped", "destroying", "failed"), True),
        ({**_path("requested", "destroying"), "container_id": "c1"}, True),
        ({}, True),  # a partial read: cool down rather than risk it
    ],
)
def test_ever_ran(doc, ran):
    assert ever_ran(doc) is ran


@pytest.fixture
async def driver() -> SagaDriver:
    d = SagaDriver(MemoryGatewayStore(), MemoryPublisher(), GatewaySettings(), clock=lambda: T0)
    await d.hosts.on_heartbeat(provisioner.HostHeartbeat(
        host_id="h1", dc="dc1", version="t", at=T0,
        capacity=provisioner.Resources(cpus=2, memory=8 * GIB, disk=100 * GIB),
        allocated=provisioner.Resources(cpus=0, memory=0, disk=0)))  # fmt: skip
    return d


async def _running_or_failed(driver: SagaDriver, ok: bool) -> str:
    [mid] = ids = driver.new_ids(1)
    await driver.create(SPEC, ids)
    await driver.creates.on_ip_allocated(ipam.IpAllocated(
        machine_id=mid, ip="10.233.1.10", prefix_len=24, gateway="10.233.1.1", vlan_id=233,
        pool="p", dc="dc1"))  # fmt: skip
    if ok:
        await driver.creates.on_created(mid, "h1", "c1")
    else:
        await driver.creates.on_create_failed(mid, "image_not_found: no such image")
    return mid


async def test_a_create_that_failed_on_the_host_releases_its_ip_as_never_ran(driver):
    mid = await _running_or_failed(driver, ok=False)

    assert [(m.machine_id, m.ever_ran) for m in driver.publisher.of_type("ip.release")] == [
        (mid, False)
    ]


async def test_a_destroyed_machine_that_ran_releases_its_ip_to_cool_down(driver):
    mid = await _running_or_failed(driver, ok=True)
    await driver.begin_destroy(mid)
    await driver.lifecycle.on_destroyed(mid)

    assert [(m.machine_id, m.ever_ran) for m in driver.publisher.of_type("ip.release")] == [
        (mid, True)
    ]
