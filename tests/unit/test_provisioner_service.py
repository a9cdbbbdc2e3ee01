"""The agent's service, reached through its bus handlers, and its periodic jobs, on in-memory
fakes of its ports: idempotency, undo, guards, orphans."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from libs.common.bus import MemoryPublisher, MessageContext
from libs.common.contracts import Envelope, Message
from libs.common.contracts.provisioner import (
    ContainerCreate,
    ContainerDestroy,
    ContainerResize,
    ContainerRestart,
    ContainerStart,
    ContainerStop,
    ImagePrewarm,
    MachinesKnown,
)
from services.provisioner.adapters import BridgeNetwork
from services.provisioner.fakes import MemoryRuntime, MemoryVolumes
from services.provisioner.handlers import machine_handlers
from services.provisioner.service import AgentConfig, ProvisionerService
from services.provisioner.upkeep import HostUpkeep

G = 1 << 30


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def parts():
    runtime = MemoryRuntime(cpus=4, memory=8 * G)
    volumes = MemoryVolumes(total=100 * G)
    publisher = MemoryPublisher()
    clock = Clock()
    agent = ProvisionerService(
        AgentConfig(host_id="h1", dc="dc1", version="1.2", labels=(("rack", "r1"),),
                    lxcfs_path=Path("/nonexistent/lxcfs"), orphan_grace_s=10),
        runtime, BridgeNetwork(runtime, "dockvm"), volumes, publisher, clock,
    )  # fmt: skip
    return agent, runtime, volumes, publisher, clock


@pytest.fixture
def upkeep(parts) -> HostUpkeep:
    return HostUpkeep(parts[0])


def _ctx(publisher: MemoryPublisher, msg: Message) -> MessageContext:
    return MessageContext(Envelope.wrap(msg, source="test"), publisher)  # type: ignore[arg-type]


def _create(mid: str = "m1", **overrides: object) -> ContainerCreate:
    fields: dict[str, object] = {
        "machine_id": mid, "app": "web", "image": "dockvm/base:bookworm", "cpus": 1,
        "memory": "1g", "disk": "10g", "ip": "10.9.0.10", "prefix_len": 24,
        "gateway": "10.9.0.1", "vlan_id": 9, "hostname": "web1",
    }  # fmt: skip
    fields.update(overrides)
    return ContainerCreate.model_validate(fields)


async def _send(agent: ProvisionerService, publisher: MemoryPublisher, msg: Message):
    handler = machine_handlers(agent)[msg.TYPE]
    return await handler(msg, _ctx(publisher, msg))


async def test_create_makes_a_running_machine_and_announces_it(parts):
    agent, runtime, volumes, publisher, _ = parts

    result = await _send(agent, publisher, _create())

    assert result.TYPE == "container.created"
    assert str(result.ip) == "10.9.0.10" and result.host == "h1"
    assert runtime.containers["m1"].info.running
    assert runtime.containers["m1"].spec.network == "dockvm-vlan9"
    assert [m.target for m in runtime.containers["m1"].spec.mounts] == ["/data"]  # no LXCFS
    assert volumes.sizes == {"m1": 10 * G}
    assert publisher.of_type("container.created") == [result]


async def test_repeated_and_concurrent_creates_give_one_container(parts):
    agent, runtime, _, publisher, _ = parts

    results = await asyncio.gather(*(_send(agent, publisher, _create()) for _ in range(5)))
    again = await _send(agent, publisher, _create())

    assert {r.container_id for r in [*results, again]} == {runtime.containers["m1"].info.id}
    assert runtime.calls == ["create:m1"]


async def test_a_repeated_create_starts_a_stopped_container(parts):
    agent, runtime, _, publisher, _ = parts
    await _send(agent, publisher, _create())
    await _send(agent, publisher, ContainerStop(machine_id="m1"))

    result = await _send(agent, publisher, _create())

    assert result.TYPE == "container.created"
    assert runtime.containers["m1"].info.running


@pytest.mark.parametrize(
    ("setup", "overrides", "reason", "retriable"),
    [
        ("fail_start", {}, "docker_rejected", False),
        ("fail_volume", {}, "host_command_failed", False),
        ("none", {"image": "nowhere/x:1"}, "image_not_found", False),
        ("none", {"cpus": 5}, "cpus_exhausted", False),
        ("none", {"disk": "200g"}, "disk_exhausted", False),
        ("other_pool", {}, "network_mismatch", False),
    ],
)
async def test_a_failed_create_leaves_nothing_behind(parts, setup, overrides, reason, retriable):
    agent, runtime, volumes, publisher, _ = parts
    runtime.fail_start = {"m1"} if setup == "fail_start" else set()
    volumes.fail_ensure = setup == "fail_volume"
    if setup == "other_pool":
        await runtime.create_network("dockvm-vlan9", "bridge", "10.8.0.0/24", "10.8.0.1", {})

    result = await _send(agent, publisher, _create(**overrides))

    assert result.TYPE == "container.create_failed"
    assert result.reason.startswith(f"{reason}: ")
    assert result.retriable is retriable
    assert runtime.containers == {}
    assert volumes.sizes == {}
    assert list(runtime.networks) == (["dockvm-vlan9"] if setup == "other_pool" else [])


async def test_an_image_missing_here_is_pulled_from_its_registry(parts):
    agent, runtime, _, publisher, _ = parts
    runtime.pullable.add("127.0.0.1:5001/app:2")

    result = await _send(agent, publisher, _create(image="127.0.0.1:5001/app:2"))

    assert result.TYPE == "container.created"
    assert "127.0.0.1:5001/app:2" in runtime.image_refs


async def test_start_stop_restart_report_the_state(parts):
    agent, _, _, publisher, _ = parts
    await _send(agent, publisher, _create())

    stopped = await _send(agent, publisher, ContainerStop(machine_id="m1"))
    started = await _send(agent, publisher, ContainerStart(machine_id="m1"))
    restarted = await _send(agent, publisher, ContainerRestart(machine_id="m1"))

    assert [(r.action, r.state) for r in (stopped, started, restarted)] == [
        ("stop", "exited"), ("start", "running"), ("restart", "running")
    ]  # fmt: skip


@pytest.mark.parametrize("cmd", [ContainerStart(machine_id="x"), ContainerStop(machine_id="x")])
async def test_an_action_on_an_unknown_machine_fails_clearly(parts, cmd):
    agent, _, _, publisher, _ = parts

    result = await _send(agent, publisher, cmd)

    assert result.TYPE == "container.action_failed"
    assert result.reason.startswith("not_found: ")


async def test_destroy_removes_container_volume_and_unused_network(parts):
    agent, runtime, volumes, publisher, _ = parts
    await _send(agent, publisher, _create())

    first = await _send(agent, publisher, ContainerDestroy(machine_id="m1"))
    again = await _send(agent, publisher, ContainerDestroy(machine_id="m1"))

    assert (first.TYPE, again.TYPE) == ("container.destroyed", "container.destroyed")
    assert (runtime.containers, volumes.sizes, runtime.networks) == ({}, {}, {})


async def test_destroy_keeps_the_vlan_network_while_another_machine_uses_it(parts):
    agent, runtime, _, publisher, _ = parts
    await _send(agent, publisher, _create("m1"))
    await _send(agent, publisher, _create("m2", ip="10.9.0.11"))

    await _send(agent, publisher, ContainerDestroy(machine_id="m1"))

    assert list(runtime.networks) == ["dockvm-vlan9"]


async def test_destroying_a_vlans_last_machine_keeps_its_network_for_a_create_under_way(parts):
    """The create has prepared the network but attached nothing yet when the destroy runs."""
    agent, runtime, _, publisher, _ = parts
    await _send(agent, publisher, _create("m1"))
    runtime.hold = asyncio.Event()
    create = asyncio.create_task(_send(agent, publisher, _create("m2", ip="10.9.0.11")))
    async with asyncio.timeout(5):
        while runtime.inside == 0:
            await asyncio.sleep(0)

    destroyed = await _send(agent, publisher, ContainerDestroy(machine_id="m1"))
    kept = list(runtime.networks)
    runtime.hold.set()
    created = await create

    assert destroyed.TYPE == "container.destroyed"
    assert kept == ["dockvm-vlan9"]
    assert created.TYPE == "container.created", created
    assert list(runtime.containers) == ["m2"]


async def test_resize_grows_live_and_reports_the_new_limits(parts):
    agent, runtime, volumes, publisher, _ = parts
    await _send(agent, publisher, _create())
    started = runtime.containers["m1"].info.started_at

    result = await _send(
        agent, publisher, ContainerResize(machine_id="m1", cpus=2, memory="2g", disk="20g")
    )

    assert result.TYPE == "container.resized"
    assert (result.cpus, result.memory, result.disk) == (2, 2 * G, 20 * G)
    assert (runtime.containers["m1"].info.cpus, volumes.sizes["m1"]) == (2, 20 * G)
    assert runtime.containers["m1"].info.started_at == started


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"disk": "5g"}, "disk_shrink_refused"), ({"memory": "64m"}, "memory_below_usage")],
)
async def test_a_harmful_resize_is_refused_and_changes_nothing(parts, change, reason):
    agent, runtime, volumes, publisher, _ = parts
    await _send(agent, publisher, _create())
    runtime.containers["m1"].memory_used = 100 << 20

    result = await _send(agent, publisher, ContainerResize(machine_id="m1", **change))

    assert result.TYPE == "container.resize_failed"
    assert result.reason == reason
    assert (runtime.containers["m1"].info.memory, volumes.sizes["m1"]) == (G, 10 * G)


async def test_resize_of_an_unknown_machine_fails_clearly(parts):
    agent, _, _, publisher, _ = parts

    result = await _send(agent, publisher, ContainerResize(machine_id="nope", cpus=2))

    assert (result.TYPE, result.reason) == ("container.resize_failed", "not_found")


@pytest.mark.parametrize(
    ("ref", "pullable", "pulled", "error"),
    [("dockvm/base:bookworm", False, False, False), ("r/app:1", True, True, False),
     ("r/app:1", False, False, True)],
)  # fmt: skip
async def test_prewarm(parts, ref, pullable, pulled, error):
    agent, runtime, _, publisher, _ = parts
    runtime.pullable = {ref} if pullable else set()

    result = await _send(agent, publisher, ImagePrewarm(ref=ref))

    assert (result.pulled, result.error is not None) == (pulled, error)


async def test_heartbeat_sums_what_machines_were_given(parts, upkeep):
    agent, _, _, publisher, _ = parts
    await _send(agent, publisher, _create("m1", cpus=1.5))
    await _send(agent, publisher, _create("m2", ip="10.9.0.11", memory="512m", disk="5g"))

    beat = await upkeep.heartbeat()

    assert (beat.host_id, beat.dc, beat.version) == ("h1", "dc1", "1.2")
    assert beat.labels == {"rack": "r1"}
    assert (beat.capacity.cpus, beat.capacity.memory, beat.capacity.disk) == (4, 8 * G, 100 * G)
    assert (beat.allocated.cpus, beat.allocated.memory, beat.allocated.disk) == (
        2.5, G + (512 << 20), 15 * G
    )  # fmt: skip
    assert beat.machines == 2 and beat.images == ["dockvm/base:bookworm"]
    assert publisher.of_type("host.heartbeat") == [beat]


async def test_reconcile_reports_every_machine_and_quarantines_an_orphan_only_after_grace(
    parts, upkeep
):
    agent, runtime, volumes, publisher, clock = parts
    await _send(agent, publisher, _create("m1"))
    await _send(agent, publisher, _create("m2", ip="10.9.0.11"))
    await _send(agent, publisher, MachinesKnown(machine_ids=["m1"], cluster_id="c1"))

    clock.now = 1
    observed = await upkeep.reconcile()
    early = publisher.of_type("container.quarantined")
    clock.now = 12
    await _send(agent, publisher, MachinesKnown(machine_ids=["m1"], cluster_id="c1"))
    clock.now = 13
    await upkeep.reconcile()

    assert {(o.machine_id, o.orphan) for o in observed} == {("m1", False), ("m2", True)}
    assert early == []
    assert [q.machine_id for q in publisher.of_type("container.quarantined")] == ["m2"]
    # Quarantined, never deleted: the container and its disk stay.
    assert list(runtime.containers) == ["m1", "m2"] and list(volumes.sizes) == ["m1", "m2"]
    assert publisher.of_type("container.destroyed") == []


@pytest.mark.parametrize(
    ("cmd", "event"),
    [
        (ContainerDestroy(machine_id="../../etc"), "container.action_failed"),
        (ContainerStart(machine_id="../x"), "container.action_failed"),
        (ContainerResize(machine_id="a/b", cpus=1), "container.resize_failed"),
        (_create("../evil"), "container.create_failed"),
    ],
)
async def test_a_machine_id_that_could_escape_a_directory_is_refused(parts, cmd, event):
    agent, runtime, volumes, publisher, _ = parts

    result = await _send(agent, publisher, cmd)

    assert result.TYPE == event
    assert "invalid_machine_id" in (getattr(result, "reason", ""))
    assert (runtime.calls, volumes.sizes) == ([], {})
