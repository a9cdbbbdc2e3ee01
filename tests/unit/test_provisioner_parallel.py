"""Parallel creates on one host, on the in-memory fakes: the width bounds how many are inside the
runtime at once, host-wide facts are not asked per create, and disk reservations keep parallel
creates from overcommitting the disk together."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from libs.common.bus import MemoryPublisher
from libs.common.contracts.provisioner import ContainerCreate, ContainerDestroy, ContainerResize
from services.provisioner.adapters import BridgeNetwork
from services.provisioner.capacity import DiskLedger
from services.provisioner.fakes import MemoryRuntime, MemoryVolumes
from services.provisioner.service import AgentConfig, ProvisionerService
from services.provisioner.upkeep import HostUpkeep

G = 1 << 30
WIDTH = 4


def _agent(runtime: MemoryRuntime, volumes: MemoryVolumes) -> ProvisionerService:
    config = AgentConfig(
        host_id="h1", dc="dc1", lxcfs_path=Path("/nonexistent/lxcfs"), create_parallelism=WIDTH
    )
    return ProvisionerService(
        config, runtime, BridgeNetwork(runtime, "dockvm"), volumes, MemoryPublisher()
    )


def _create(n: int, disk: str = "1g") -> ContainerCreate:
    return ContainerCreate.model_validate({
        "machine_id": f"m{n}", "app": "web", "image": "dockvm/base:bookworm", "cpus": 0.05,
        "memory": "64m", "disk": disk, "ip": f"10.9.0.{10 + n}", "prefix_len": 24,
        "gateway": "10.9.0.1", "vlan_id": 9, "hostname": f"web{n}",
    })  # fmt: skip


async def _until(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (every step of the fakes is in memory)."""
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0)


async def _settle() -> None:
    """Give every runnable task many turns, so a create that could still get in would."""
    for _ in range(200):
        await asyncio.sleep(0)


@pytest.fixture
def runtime() -> MemoryRuntime:
    return MemoryRuntime(cpus=4, memory=8 * G, hold=asyncio.Event())


async def test_creates_run_in_parallel_but_never_more_than_the_width(runtime):
    agent = _agent(runtime, MemoryVolumes(total=100 * G))

    tasks = [asyncio.create_task(agent.create(_create(n))) for n in range(3 * WIDTH)]
    await _until(lambda: runtime.inside == WIDTH)
    await _settle()
    held = runtime.inside
    runtime.hold.set()
    results = await asyncio.gather(*tasks)

    assert held == WIDTH and runtime.most_inside == WIDTH
    assert [r.TYPE for r in results] == ["container.created"] * (3 * WIDTH)


async def test_a_batch_asks_the_host_its_size_once(runtime):
    agent = _agent(runtime, MemoryVolumes(total=100 * G))
    runtime.hold.set()

    await asyncio.gather(*(agent.create(_create(n)) for n in range(10)))
    asked_by_creates = runtime.host_calls
    await HostUpkeep(agent).heartbeat()

    assert (asked_by_creates, runtime.host_calls) == (1, 2)


async def test_parallel_creates_over_the_disk_admit_only_what_fits(runtime):
    agent = _agent(runtime, MemoryVolumes(total=10 * G))

    # Width 4, six 3 GiB disks on 10 GiB: every create passes its check while the others run.
    tasks = [asyncio.create_task(agent.create(_create(n, disk="3g"))) for n in range(6)]
    await _until(lambda: sum(t.done() for t in tasks) == 3)
    await _settle()
    runtime.hold.set()
    results = await asyncio.gather(*tasks)

    created = [r for r in results if r.TYPE == "container.created"]
    refused = [r for r in results if r.TYPE == "container.create_failed"]
    assert (len(created), len(refused)) == (3, 3)
    assert all(r.reason.startswith("disk_exhausted") for r in refused)
    assert sum((await agent.volumes.capacity())[1:]) == 1 * G


async def test_a_failed_create_gives_its_disk_back(runtime):
    volumes = MemoryVolumes(total=10 * G)
    agent = _agent(runtime, volumes)
    runtime.hold.set()
    runtime.fail_start = {"m1"}

    failed = await agent.create(_create(1, disk="6g"))
    made = await agent.create(_create(2, disk="6g"))

    assert (failed.TYPE, made.TYPE) == ("container.create_failed", "container.created")
    assert volumes.sizes == {"m2": 6 * G}


async def test_a_destroyed_disk_is_free_for_the_next_create(runtime):
    agent = _agent(runtime, MemoryVolumes(total=10 * G))
    runtime.hold.set()
    await agent.create(_create(1, disk="6g"))

    await agent.destroy(ContainerDestroy(machine_id="m1"))
    again = await agent.create(_create(2, disk="6g"))

    assert again.TYPE == "container.created"


async def test_the_heartbeat_ends_the_reservations_it_measured(runtime):
    agent = _agent(runtime, MemoryVolumes(total=10 * G))
    runtime.hold.set()
    await agent.create(_create(1, disk="6g"))
    reserved = dict(agent.capacity.disk.reserved)

    await HostUpkeep(agent).heartbeat()

    assert reserved == {"m1": 6 * G}
    assert (agent.capacity.disk.reserved, agent.capacity.disk.available) == ({}, 4 * G)


async def test_a_disk_growth_is_reserved_like_a_create(runtime):
    # 2 + 2 GiB made, 5 GiB free: one growth of 3 GiB fits, two do not.
    agent = _agent(runtime, MemoryVolumes(total=9 * G))
    runtime.hold.set()
    await agent.create(_create(1, disk="2g"))
    await agent.create(_create(2, disk="2g"))

    grown, refused = await asyncio.gather(
        agent.resize(ContainerResize(machine_id="m1", disk="5g")),
        agent.resize(ContainerResize(machine_id="m2", disk="5g")),
    )

    assert (grown.TYPE, refused.TYPE) == ("container.resized", "container.resize_failed")
    assert refused.reason == "disk_exhausted"


def test_a_measurement_under_way_keeps_a_reservation_it_may_not_count():
    ledger = DiskLedger(measured=10 * G)
    ledger.reserve("a", 3 * G)
    counted = ledger.measure_started()  # "a" is still being made: its disk may be unseen
    ledger.finish("a")
    ledger.measured_as(7 * G, counted)
    conservative = ledger.available
    ledger.measured_as(7 * G, ledger.measure_started())

    assert (conservative, ledger.available) == (4 * G, 7 * G)
