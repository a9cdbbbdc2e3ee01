"""End to end on the real stack: gateway + ipam + two provisioner agents as real processes.

The two agents have different host ids and share the local Docker engine. Every machine,
network, loop device and volume made here is removed at the end (by machine id and by this run's
network prefix), even when a test fails.
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
import asyncssh
import docker
import pytest

IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dve{RUN}"
KEY = asyncssh.generate_private_key("ssh-ed25519")
HOSTS = (f"e2e-a-{RUN}", f"e2e-b-{RUN}")


@dataclass
class Stack:
    """The running services and an admin client of the gateway."""

    api: aiohttp.ClientSession
    gateway: object
    states: list[Path]
    subnet: str
    vlan: int

    def spec(self, **over: object) -> dict:
        """A machine spec on this run's pool."""
        return {
            "app": "e2e", "image": IMAGE, "cpus": 0.5, "memory": "256m", "disk": "1g",
            "dc": "dc1", "vlan_id": self.vlan,
            "ssh_keys": [KEY.export_public_key().decode().strip()], "direct_ssh": True, **over,
        }


def _cleanup(states: list[Path]) -> None:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        nets = [n for n in client.networks.list() if n.name.startswith(PREFIX)]
        for net in nets:
            net.reload()
            for cid in (net.attrs.get("Containers") or {}):
                client.containers.get(cid).remove(force=True)
        for state in states:
            mounts = Path("/proc/self/mounts").read_text().splitlines()
            for line in mounts:
                if line.split()[1].startswith(str(state)):
                    subprocess.run(["umount", "-l", line.split()[1]], check=False)
            out = subprocess.run(["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"],
                                 capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                if str(state) in line:
                    subprocess.run(["losetup", "-d", line.split()[0]], check=False)
        for net in nets:
            net.remove()
    finally:
        client.close()


@pytest.fixture
async def stack(start_service, service_env, tmp_path) -> AsyncIterator[Stack]:
    """ipam, two agents and the gateway, with a fresh pool on a VLAN of this run."""
    n = random.randint(100, 250)
    subnet, vlan = f"10.233.{n}.0/24", 2000 + n
    states = [tmp_path / h for h in HOSTS]
    agent_env = {"DOCKVM_NETWORK_PREFIX": PREFIX, "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
                 "DOCKVM_STOP_TIMEOUT_S": "2"}
    try:
        await start_service("ipam")
        for host, state in zip(HOSTS, states, strict=True):
            await start_service("provisioner", "--host-id", host,
                                env={**agent_env, "DOCKVM_STATE_DIR": str(state)})
        gateway = await start_service("gateway")
        token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
        async with aiohttp.ClientSession(
            gateway.url, headers={"Authorization": f"Bearer {token}"}
        ) as api:
            pool = {"name": f"p{n}", "dc": "dc1", "vlan_id": vlan, "cidr": subnet,
                    "gateway": f"10.233.{n}.1", "cooldown_s": 3600}
            async with api.post("/v1/pools", json=pool) as r:
                assert r.status == 201, await r.text()
            await _hosts_online(api)
            stack = Stack(api, gateway, states, subnet, vlan)
            # Both agents share one engine, so the VLAN's Docker network is made once here
            # (by this machine, kept to the end) rather than raced by two agents at once.
            async with api.post("/v1/machines?wait=120", json=stack.spec(app="warm")) as r:
                warm = (await r.json())["machines"][0]
            async with api.get(f"/v1/machines/{warm['id']}") as r:
                warm = await r.json()
            assert warm["state"] == "running", warm
            try:
                yield stack
            finally:
                await _delete_all(api)
    finally:
        _cleanup(states)


async def _hosts_online(api: aiohttp.ClientSession) -> None:
    async with asyncio.timeout(60):
        while True:
            async with api.get("/v1/hosts") as r:
                online = {h["id"] for h in (await r.json())["items"] if h["status"] == "online"}
            if online >= set(HOSTS):
                return
            await asyncio.sleep(0.2)


async def _machines(api: aiohttp.ClientSession, **params: str) -> list[dict]:
    async with api.get("/v1/machines", params={"limit": "1000", **params}) as r:
        return (await r.json())["items"]


async def _settle(api: aiohttp.ClientSession, ids: list[str], timeout: float = 180) -> list[dict]:
    """Wait until none of ``ids`` has an operation in flight."""
    async with asyncio.timeout(timeout):
        while True:
            ms = await _machines(api, ids=",".join(ids))
            if all(m["pending"] is None and m["state"] not in (
                "requested", "ip_assigned", "placed", "creating", "destroying") for m in ms):
                return ms
            await asyncio.sleep(0.3)


async def _delete_all(api: aiohttp.ClientSession) -> None:
    live = [m["id"] for m in await _machines(api) if m["state"] not in ("destroyed",)]
    for mid in live:
        async with api.delete(f"/v1/machines/{mid}"):
            pass
    if live:
        await _settle(api, live)


async def _ssh_hostname(ip: str) -> str:
    async with asyncio.timeout(60):
        while True:
            try:
                async with asyncssh.connect(ip, username="root", client_keys=[KEY],
                                            known_hosts=None, connect_timeout=5) as conn:
                    return (await conn.run("hostname", check=True)).stdout.strip()
            except (OSError, asyncssh.Error):
                await asyncio.sleep(0.5)


def _containers(ids: list[str]) -> list[str]:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        # The low-level list: the high-level one inspects each container in a second call, and
        # one another test's agent removes in between would raise a 404.
        listed = client.api.containers(all=True, filters={"label": "dockvm.machine_id"})
        return [c["Labels"]["dockvm.machine_id"] for c in listed
                if c["Labels"]["dockvm.machine_id"] in ids]  # fmt: skip
    finally:
        client.close()


def _limits(mid: str) -> tuple[float, int]:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        c = client.containers.list(all=True, filters={"label": f"dockvm.machine_id={mid}"})[0]
        hc = c.attrs["HostConfig"]
        cpus = hc["NanoCpus"] / 1e9 or hc["CpuQuota"] / (hc["CpuPeriod"] or 100_000)
        return cpus, hc["Memory"]
    finally:
        client.close()


async def test_machine_lifecycle_through_the_gateway(stack: Stack):
    api = stack.api
    async with api.post("/v1/machines?wait=180", json=stack.spec(count=3)) as r:
        assert r.status == 202, await r.text()
        ids = [m["id"] for m in (await r.json())["machines"]]
    created = await _machines(api, ids=",".join(ids))
    hostnames = [await _ssh_hostname(m["ip"]) for m in created]

    # 1. three running machines, distinct IPs of the pool, over both hosts; 2. SSH works.
    assert [m["state"] for m in created] == ["running"] * 3
    assert len({m["ip"] for m in created}) == 3
    assert all(m["ip"].startswith(stack.subnet.rsplit(".", 1)[0] + ".") for m in created)
    assert {m["host"] for m in created} == set(HOSTS)
    assert hostnames == [m["hostname"] for m in created]

    # 3. a live resize.
    async with api.patch(f"/v1/machines/{ids[0]}", json={"cpus": 1, "memory": "512m"}) as r:
        resized = await r.json()
    assert (r.status, resized["cpus"], resized["memory"], resized["state"]) == (
        200, 1.0, 512 << 20, "running")
    assert _limits(ids[0]) == (1.0, 512 << 20)

    # 4. scale to 5, then to 2: the newest go.
    async with api.post("/v1/apps/e2e/scale", json={"count": 5}) as r:
        out = await r.json()
    grown = await _settle(api, out["created"])
    async with api.post("/v1/apps/e2e/scale", json={"count": 2}) as r:
        back = await r.json()
    await _settle(api, back["destroying"])
    remaining = await _machines(api, app="e2e", state="running")

    assert [m["state"] for m in grown] == ["running"] * 2
    assert sorted(back["destroying"]) == sorted([*out["created"], ids[2]])
    assert sorted(m["id"] for m in remaining) == sorted(ids[:2])

    # 5. delete all: IPs cooling, nothing left on the engine or on disk.
    everyone = [*ids, *out["created"]]
    for mid in ids[:2]:
        async with api.delete(f"/v1/machines/{mid}") as r:
            assert r.status == 202
    final = await _settle(api, everyone)
    leases = []
    for m in final:
        async with api.get(f"/v1/ips/{m['ip']}") as r:
            leases.append((await r.json())["lease"]["state"])

    assert [m["state"] for m in final] == ["destroyed"] * 5
    assert leases == ["cooling"] * 5
    assert _containers(everyone) == []
    assert [p for s in stack.states for mid in everyone
            for p in (s / "volumes").glob(f"{mid}*")] == []


async def test_kill_9_of_the_gateway_mid_create_resumes_without_ip_leaks(stack: Stack):
    api = stack.api
    async with api.post("/v1/machines", json=stack.spec(count=5, app="crash")) as r:
        ids = [m["id"] for m in (await r.json())["machines"]]
    async with asyncio.timeout(60):
        while not any(m["state"] == "creating" for m in await _machines(api, ids=",".join(ids))):
            await asyncio.sleep(0.05)
    stack.gateway.kill()
    await stack.gateway.proc.wait()
    await stack.gateway.start()
    final = await _settle(api, ids)
    running = [m for m in final if m["state"] == "running"]
    async with api.get("/v1/pools", params={"dc": "dc1"}) as r:
        pool = next(p for p in (await r.json())["pools"] if p["vlan_id"] == stack.vlan)

    assert {m["state"] for m in final} <= {"running", "failed"}
    assert pool["usage"]["allocated"] == len(running) + 1  # and the warm-up machine
    assert sorted(_containers(ids)) == sorted(m["id"] for m in running)
