"""The ContainerRuntime contract, run against the in-memory fake and the real Docker Engine, so
the fake the unit tests use cannot drift from what Docker does."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import docker
import pytest

from libs.common.errors import ConflictError, NotFoundError
from services.provisioner.adapters import DockerRuntime
from services.provisioner.domain import ContainerSpec
from services.provisioner.fakes import MemoryRuntime

IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
RUN = uuid.uuid4().hex[:6]


@pytest.fixture(params=["memory", "docker"])
async def runtime(request: pytest.FixtureRequest) -> AsyncIterator[DockerRuntime | MemoryRuntime]:
    """The fake, or the real engine with everything this run made removed afterwards."""
    if request.param == "memory":
        yield MemoryRuntime()
        return
    rt = DockerRuntime("unix:///var/run/docker.sock", workers=2)
    yield rt
    rt.close()
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    for c in client.containers.list(all=True, filters={"label": f"dockvm.test={RUN}"}):
        c.remove(force=True)
    for n in client.networks.list(names=[f"dvc{RUN}"]):
        n.remove()
    client.close()


def _spec(mid: str, network: str) -> ContainerSpec:
    return ContainerSpec(
        name=f"dockvm-{mid}", image=IMAGE, hostname="c1",
        labels={"dockvm.machine_id": mid, "dockvm.ip": "10.231.240.5", "dockvm.test": RUN},
        env={}, cpus=0.5, memory=128 << 20, pids_limit=256, mounts=(), network=network,
        ip="10.231.240.5", stop_timeout_s=1,
    )  # fmt: skip


async def test_lifecycle_contract(runtime):
    mid = f"dvc{RUN}-{uuid.uuid4().hex[:6]}"
    net = f"dvc{RUN}-net"
    made = await runtime.create_network(net, "bridge", "10.231.240.0/24", "10.231.240.1", {})

    created = await runtime.create(_spec(mid, net))
    with pytest.raises(ConflictError):
        await runtime.create(_spec(mid, net))
    started = await runtime.start(mid)
    again = await runtime.start(mid)
    await runtime.update(mid, 1.5, 256 << 20)
    updated = await runtime.find(mid)
    listed = [c.machine_id for c in await runtime.list_managed()]
    net_in_use = await runtime.remove_network(net)
    stopped = await runtime.stop(mid, 1)
    removed = await runtime.remove(mid)
    removed_again = await runtime.remove(mid)
    net_removed = await runtime.remove_network(net)

    assert (made.subnet, made.gateway) == ("10.231.240.0/24", "10.231.240.1")
    assert (created.state, created.machine_id, created.ip) == ("created", mid, "10.231.240.5")
    assert started.running and started.started_at is not None and started.pid > 0
    assert again.started_at == started.started_at
    assert (updated.cpus, updated.memory) == (1.5, 256 << 20)
    assert mid in listed
    assert net_in_use is False
    assert stopped.state == "exited"
    assert (removed, removed_again, net_removed) == (True, False, True)
    assert await runtime.find(mid) is None
    assert await runtime.network(net) is None


@pytest.mark.parametrize("op", ["start", "stop", "update", "memory_used"])
async def test_operations_on_a_missing_container_raise_not_found(runtime, op):
    calls = {
        "start": lambda: runtime.start("nope-x"),
        "stop": lambda: runtime.stop("nope-x", 1),
        "update": lambda: runtime.update("nope-x", 1, None),
        "memory_used": lambda: runtime.memory_used("nope-x"),
    }
    with pytest.raises(NotFoundError):
        await calls[op]()


async def test_images_and_host_resources(runtime):
    cpus, memory = await runtime.host_resources()

    assert await runtime.has_image(IMAGE) is True
    assert await runtime.has_image("127.0.0.1:5001/nope/never:1") is False
    assert IMAGE in await runtime.images()
    assert cpus >= 1 and memory > 1 << 30
    with pytest.raises(NotFoundError):
        await runtime.pull("127.0.0.1:5001/nope/never:1")


async def test_image_labels_of_a_held_image_and_none_of_a_missing_one(runtime):
    labels = await runtime.image_labels(IMAGE)

    assert labels.get("dockvm.init") is None  # the base runs tini: it says nothing
    with pytest.raises(NotFoundError):
        await runtime.image_labels("127.0.0.1:5001/nope/never:1")
