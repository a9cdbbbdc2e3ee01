"""A batch of 50 machines on one host, end to end on the real stack: all run, with distinct IPs,
and a destroy of all of them leaves no container, loop device, mount, volume or network behind.

The services are real processes (ipam, one provisioner agent, the gateway) on this test's vhost,
database and network prefix; the 100-machine batch runs in ``make bench`` (bench/api.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import docker
import docker.errors
import pytest

IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dvs{RUN}"
HOST = f"scale-{RUN}"
N = 50


def _engine_leftovers(state: Path, ids: list[str]) -> dict[str, list[str]]:
    """What this test's agent made that is still on the engine or the host."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        # The low-level list, which does not inspect each container in a second call.
        containers = [
            c["Names"][0].lstrip("/")
            for c in client.api.containers(all=True, filters={"label": "dockvm.machine_id"})
            if c["Labels"]["dockvm.machine_id"] in ids
        ]
        # A network with a container still on it; dockerd can keep a network whose last
        # container went (phantom "active endpoints" after many parallel removals, moby#17217),
        # which only a dockerd restart clears, so the network itself is not counted.
        networks = [
            n.name
            for n in client.networks.list(greedy=True)
            if n.name.startswith(PREFIX) and n.attrs.get("Containers")
        ]
    finally:
        client.close()
    loops = subprocess.run(
        ["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"], capture_output=True, text=True, check=False
    ).stdout
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    volumes = state / "volumes"
    return {
        "containers": containers,
        "networks": networks,
        "loop devices": [line for line in loops.splitlines() if str(state) in line],
        "mounts": [line for line in mounts if str(state) in line.split()[1]],
        # The mount-point folder stays; a machine's image file or mount point must not.
        "volume files": sorted(
            str(p.relative_to(volumes)) for p in volumes.rglob("*") if p.name.startswith("m-")
        ),
    }


def _cleanup(state: Path) -> None:
    """Remove whatever a failed run left (the containers on this run's networks, the networks)."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        for net in client.networks.list():
            if net.name.startswith(PREFIX):
                net.reload()
                for cid in net.attrs.get("Containers") or {}:
                    client.containers.get(cid).remove(force=True)
                try:
                    net.remove()
                except docker.errors.APIError:
                    pass  # phantom endpoints (see _engine_leftovers): only a dockerd restart

    finally:
        client.close()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        if line.split()[1].startswith(str(state)):
            subprocess.run(["umount", "-l", line.split()[1]], check=False)
    loops = subprocess.run(
        ["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"], capture_output=True, text=True, check=False
    ).stdout
    for line in loops.splitlines():
        if str(state) in line:
            subprocess.run(["losetup", "-d", line.split()[0]], check=False)


@dataclass
class Scale:
    """An admin client of this test's gateway, its pool's VLAN and the agent's state dir."""

    api: aiohttp.ClientSession
    vlan: int
    state: Path


@pytest.fixture
async def scale(start_service, service_env, tmp_path) -> AsyncIterator[Scale]:
    """ipam, one agent and the gateway, with a fresh /24 pool on a VLAN of this run."""
    n = random.randint(100, 250)
    state = tmp_path / "agent"
    try:
        await start_service("ipam")
        await start_service(
            "provisioner",
            "--host-id",
            HOST,
            env={
                "DOCKVM_NETWORK_PREFIX": PREFIX,
                "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
                "DOCKVM_STOP_TIMEOUT_S": "2",
                "DOCKVM_STATE_DIR": str(state),
            },
        )
        # 50 machines of 0.05 CPU on a 2-core host: past the default 4x CPU overcommit.
        gateway = await start_service("gateway", env={"DOCKVM_OVERCOMMIT_CPU": "16"})
        token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
        async with aiohttp.ClientSession(
            gateway.url, headers={"Authorization": f"Bearer {token}"}
        ) as session:
            pool = {
                "name": f"s{n}",
                "dc": "dc1",
                "vlan_id": 2000 + n,
                "cidr": f"10.232.{n}.0/24",
                "gateway": f"10.232.{n}.1",
                "cooldown_s": 0,
            }
            async with session.post("/v1/pools", json=pool) as r:
                assert r.status == 201, await r.text()
            async with asyncio.timeout(60):
                while True:
                    async with session.get("/v1/hosts") as r:
                        if any(h["id"] == HOST for h in (await r.json())["items"]):
                            break
                    await asyncio.sleep(0.2)
            yield Scale(session, 2000 + n, state)
    finally:
        _cleanup(state)


async def _machines(api: aiohttp.ClientSession, ids: list[str]) -> list[dict]:
    async with api.get("/v1/machines", params={"ids": ",".join(ids), "limit": "1000"}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["items"]


async def _delete(api: aiohttp.ClientSession, mid: str) -> int:
    while True:  # 503: the database was busy; a client asks again
        async with api.delete(f"/v1/machines/{mid}") as r:
            if r.status != 503:
                return r.status
        await asyncio.sleep(0.2)


async def test_a_batch_of_50_runs_with_distinct_ips_and_is_destroyed_without_leftovers(
    scale: Scale,
):
    api = scale.api
    spec = {
        "app": "scale",
        "image": IMAGE,
        "cpus": 0.05,
        "memory": "64m",
        "disk": "512m",
        "dc": "dc1",
        "vlan_id": scale.vlan,
        "count": N,
    }
    async with api.post("/v1/machines?wait=600", json=spec) as r:
        assert r.status == 202, await r.text()
        ids = [m["id"] for m in (await r.json())["machines"]]
    created = await _machines(api, ids)

    assert len(ids) == N
    assert [m["state"] for m in created] == ["running"] * N
    assert len({m["ip"] for m in created}) == N

    statuses = await asyncio.gather(*(_delete(api, mid) for mid in ids))
    async with asyncio.timeout(300):
        while True:
            final = await _machines(api, ids)
            if all(m["state"] == "destroyed" and m["pending"] is None for m in final):
                break
            await asyncio.sleep(0.5)

    assert set(statuses) == {202}
    assert _engine_leftovers(scale.state, ids) == {
        "containers": [],
        "networks": [],
        "loop devices": [],
        "mounts": [],
        "volume files": [],
    }
