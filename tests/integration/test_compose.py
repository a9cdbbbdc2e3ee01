"""The control plane from the dockvm image under docker-compose, the host agent outside.

`scripts/image.sh build` (cached layers) makes the image; compose/compose.sh brings gateway,
ipam, imagesync, bastion and builder up on this test's vhost, database, state dir and ports
(its own env file and compose project), so it runs beside `make run` and other tests. A
provisioner runs on the host as a subprocess, like a systemd unit would; a machine is created,
resized, released to (demo-app from the local Maven repository) and destroyed through the
gateway in its container; then ipam and the gateway are replaced by a newer image during a
20-machine create. Everything is removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import docker
import pytest

from tests.integration.test_releases_e2e import _finished, _start
from tests.support.services import ROOT
from tests.support.stack import free_port
from tests.support.subnets import free_24

pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="Debian's docker-compose (v1) is not installed: scripts/install.sh installs it",
)

IMAGE_BASE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dvc{RUN}"
SERVICES = ("gateway", "ipam", "imagesync", "bastion", "builder")


@dataclass
class Compose:
    """The compose project of this test and an admin client of its gateway."""

    project: str
    env: dict[str, str]
    api: aiohttp.ClientSession
    state: Path
    secrets: Path
    # Images a test made, removed once compose is down (a container still uses them before).
    images: list[str] = field(default_factory=list)


def _compose(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    out = subprocess.run(
        [str(ROOT / "compose/compose.sh"), *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, f"compose.sh {args}: {out.stdout}\n{out.stderr}"
    return out.stdout


def _project_containers(project: str) -> list[dict]:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        return client.api.containers(
            all=True, filters={"label": f"com.docker.compose.project={project}"}
        )
    finally:
        client.close()


def _cleanup_machines(agent_state: Path) -> None:
    """This run's machines, networks, and the agent's volume mounts and loop devices."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        nets = [n for n in client.networks.list() if n.name.startswith(PREFIX)]
        for net in nets:
            net.reload()
            for cid in net.attrs.get("Containers") or {}:
                client.containers.get(cid).remove(force=True)
            net.remove()
    finally:
        client.close()
    for line in reversed(Path("/proc/self/mounts").read_text().splitlines()):
        if line.split()[1].startswith(f"{agent_state}/"):
            subprocess.run(["umount", "-l", line.split()[1]], check=False)
    out = subprocess.run(
        ["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        if f"{agent_state}/" in line:
            subprocess.run(["losetup", "-d", line.split()[0]], check=False)


@pytest.fixture(scope="module")
def image() -> str:
    """dockvm/dockvm:<version>, built (or found in the layer cache) by scripts/image.sh."""
    out = subprocess.run(
        [str(ROOT / "scripts/image.sh"), "build"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
async def compose(image, vhost, db_name, mongo_db, tmp_path) -> AsyncIterator[Compose]:
    """The five control-plane containers on this test's vhost, database and ports."""
    project = f"dvtest{RUN}"
    ports = {f"DOCKVM_{s.upper()}_PORT": str(free_port()) for s in SERVICES}
    env_file = tmp_path / "compose.env"
    env_file.write_text(
        "".join(f"{k}={v}\n" for k, v in ports.items())
        + f"COMPOSE_PROJECT_NAME={project}\nDOCKVM_COMPOSE_VHOST={vhost.name}\n"
        f"DOCKVM_MONGO_DB={db_name}\nDOCKVM_BASTION_SSH_PORT={free_port()}\n"
        "DOCKVM_REQUIRE_BUILT_IMAGES=false\n"
    )
    env = {
        "DOCKVM_COMPOSE_ENV": str(env_file),
        "DOCKVM_IMAGE": image,
        "DOCKVM_COMPOSE_STATE": str(tmp_path / "cstate"),
        "DOCKVM_COMPOSE_SECRETS": str(tmp_path / "csecrets"),
        **ports,
    }
    made: list[str] = []
    try:
        _compose(env, "up")
        token = (tmp_path / "cstate" / "admin.token").read_text().strip()
        url = f"http://127.0.0.1:{ports['DOCKVM_GATEWAY_PORT']}"
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(url, headers=headers) as api:
            yield Compose(project, env, api, tmp_path / "cstate", tmp_path / "csecrets", made)
    finally:
        try:
            _compose(env, "down", timeout=120)
        finally:
            _cleanup_machines(tmp_path / "agent")
            for made_image in made:
                _docker("rmi", made_image)


async def _wait_healthy(project: str, timeout: float = 90) -> dict[str, str]:
    """Each service's Docker health status, once all are healthy (or at the timeout)."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        async with asyncio.timeout(timeout):
            while True:
                health = {}
                for c in _project_containers(project):
                    svc = c["Labels"]["com.docker.compose.service"]
                    state = client.api.inspect_container(c["Id"])["State"]
                    health[svc] = state.get("Health", {}).get("Status", "none")
                if sorted(health) == sorted(SERVICES) and set(health.values()) == {"healthy"}:
                    return health
                await asyncio.sleep(1)
    finally:
        client.close()


async def _settled(api: aiohttp.ClientSession, mid: str, states: set[str]) -> dict:
    async with asyncio.timeout(120):
        while True:
            async with api.get(f"/v1/machines/{mid}") as r:
                m = await r.json()
            if m["state"] in states and m["pending"] is None:
                return m
            await asyncio.sleep(0.3)


async def _agent_and_pool(compose: Compose, start_service, tmp_path: Path) -> dict:
    """A provisioner on the host (outside compose) online, a pool of this run; a spec on it."""
    host = f"cmp-{RUN}"
    await start_service(
        "provisioner",
        "--host-id",
        host,
        env={
            "DOCKVM_NETWORK_PREFIX": PREFIX,
            "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
            "DOCKVM_STOP_TIMEOUT_S": "2",
            "DOCKVM_STATE_DIR": str(tmp_path / "agent"),
        },
    )
    api = compose.api
    n = free_24(100, 250)
    pool = {
        "name": f"c{RUN}",
        "dc": "dc1",
        "vlan_id": 1000 + n,
        "cidr": f"10.234.{n}.0/24",
        "gateway": f"10.234.{n}.1",
        "cooldown_s": 3600,
    }
    async with api.post("/v1/pools", json=pool) as r:
        assert r.status == 201, await r.text()
    async with asyncio.timeout(60):
        while True:
            async with api.get("/v1/hosts") as r:
                if any(
                    h["id"] == host and h["status"] == "online" for h in (await r.json())["items"]
                ):
                    break
            await asyncio.sleep(0.3)
    return {
        "app": "compose",
        "image": IMAGE_BASE,
        "cpus": 0.5,
        "memory": "256m",
        "disk": "1g",
        "dc": "dc1",
        "vlan_id": 1000 + n,
    }


def _on_engine(ids: list[str]) -> list[str]:
    """The machine ids among ``ids`` that have a container on the engine."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        listed = client.api.containers(all=True, filters={"label": "dockvm.machine_id"})
        return [c["Labels"]["dockvm.machine_id"] for c in listed
                if c["Labels"]["dockvm.machine_id"] in ids]  # fmt: skip
    finally:
        client.close()


async def test_compose_control_plane_with_a_host_agent_outside(
    compose: Compose, start_service, tmp_path
):
    health = await _wait_healthy(compose.project)
    secret_files = sorted(p.name for p in compose.secrets.iterdir())
    modes = {oct(stat.S_IMODE(p.stat().st_mode)) for p in compose.secrets.iterdir()}
    client = docker.APIClient()
    envs = [e for c in _project_containers(compose.project)
            for e in client.inspect_container(c["Id"])["Config"]["Env"]]  # fmt: skip
    client.close()

    # The image's HEALTHCHECK passes for each; secrets are 0400 files, never container env.
    assert health == dict.fromkeys(SERVICES, "healthy")
    assert secret_files == [
        "DOCKVM_AMQP_URL",
        "DOCKVM_MONGO_URL",
        "DOCKVM_WEBHOOK_SECRET",
        "MONGO_PASSWORD",
        "RABBITMQ_PASSWORD",
    ]
    assert modes == {"0o400"}
    assert not [e for e in envs if e.startswith(("DOCKVM_AMQP_URL=", "DOCKVM_WEBHOOK_SECRET="))]
    assert stat.S_IMODE((compose.state / "admin.token").stat().st_mode) == 0o600

    spec = await _agent_and_pool(compose, start_service, tmp_path)
    api = compose.api
    async with api.post("/v1/machines?wait=120", json=spec) as r:
        assert r.status == 202, await r.text()
        mid = (await r.json())["machines"][0]["id"]
    created = await _settled(api, mid, {"running", "failed"})
    on_engine = _on_engine([mid])
    async with api.patch(f"/v1/machines/{mid}", json={"cpus": 1, "memory": "512m"}) as r:
        resized, resize_status = await r.json(), r.status
    released = await _release(api, "1.0.0")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(f"http://{created['ip']}:8000/") as r:
            served = await r.text()
    async with api.delete(f"/v1/machines/{mid}") as r:
        assert r.status == 202, await r.text()
    destroyed = await _settled(api, mid, {"destroyed", "failed"})

    # Created on the host agent through the containerised gateway, resized, released to from
    # the Maven repository, destroyed.
    assert (created["state"], created["host"]) == ("running", f"cmp-{RUN}")
    assert on_engine == [mid]
    assert (resize_status, resized["cpus"], resized["memory"]) == (200, 1.0, 512 << 20)
    assert (released["status"], list(released["machines"])) == ("succeeded", [mid]), released
    assert served == "demo-app 1.0.0\n"
    assert destroyed["state"] == "destroyed"
    assert _on_engine([mid]) == []


async def _release(api: aiohttp.ClientSession, version: str) -> dict:
    """Roll demo-app ``version`` onto the app's machines; the release once it ended."""
    body = {"app": "compose", "group_id": "com.example", "artifact_id": "demo-app",
            "version": version, "batch_size": 1,
            "health_check": {"type": "http", "target": "8000/", "timeout_s": 60}}  # fmt: skip
    return await _finished(api, (await _start(api, body))["id"])


def _newer_image(image: str) -> str:
    """A newer release of ``image``: the same bits under a new tag and label (another id)."""
    tag = f"{image}-next{RUN}"
    subprocess.run(
        ["docker", "build", "-q", "-t", tag, "-"],
        check=True,
        timeout=120,
        input=f"FROM {image}\nLABEL dockvm.test.release=next{RUN}\n",
        capture_output=True,
        text=True,
    )
    return tag


def _docker(*args: str) -> None:
    subprocess.run(["docker", *args], capture_output=True, timeout=60, check=False)


def _image_of(project: str, service: str) -> str:
    client = docker.APIClient()
    try:
        c = next(
            c
            for c in client.containers(
                filters={
                    "label": [
                        f"com.docker.compose.project={project}",
                        f"com.docker.compose.service={service}",
                    ]
                }
            )
        )
        return c["Image"]
    finally:
        client.close()


async def test_ipam_and_gateway_replaced_by_a_newer_image_during_a_20_machine_create(
    compose: Compose, start_service, tmp_path, image
):
    spec = await _agent_and_pool(compose, start_service, tmp_path)
    api = compose.api
    newer = _newer_image(image)
    compose.images.append(newer)
    env = {**compose.env, "DOCKVM_IMAGE": newer}
    # ipam stopped as an upgrade stops it (SIGTERM, drain): the create's IP requests wait
    # on the bus. Then the gateway killed (SIGKILL) with 20 sagas in flight, and both
    # started from the newer image.
    await asyncio.to_thread(_docker, "stop", f"{compose.project}_ipam_1")
    small = {"cpus": 0.1, "memory": "128m", "disk": "512m", "count": 20}
    async with api.post("/v1/machines", json={**spec, **small}) as r:
        assert r.status == 202, await r.text()
        ids = [m["id"] for m in (await r.json())["machines"]]
    waiting = await _machines(api, ids)
    await asyncio.to_thread(_docker, "kill", f"{compose.project}_gateway_1")
    await asyncio.to_thread(_compose, env, "replace", "ipam", "gateway")
    final = await _all_settled(api, ids)
    async with api.get("/v1/pools", params={"dc": "dc1"}) as r:
        pool = next(p for p in (await r.json())["pools"] if p["vlan_id"] == spec["vlan_id"])
    images = {s: _image_of(compose.project, s) for s in ("ipam", "gateway")}
    on_engine = _on_engine(ids)
    for mid in ids:
        async with api.delete(f"/v1/machines/{mid}"):
            pass
    gone = await _all_settled(api, ids)

    # Every machine ran, each with its own IP, none leaked; the two run the newer image.
    assert {m["state"] for m in waiting} == {"requested"}
    assert [m["state"] for m in final] == ["running"] * 20
    assert len({m["ip"] for m in final}) == 20
    assert pool["usage"]["allocated"] == 20
    assert sorted(on_engine) == sorted(ids)
    assert images == {"ipam": newer, "gateway": newer}
    assert [m["state"] for m in gone] == ["destroyed"] * 20
    assert _on_engine(ids) == []


async def _machines(api: aiohttp.ClientSession, ids: list[str]) -> list[dict]:
    async with api.get("/v1/machines", params={"ids": ",".join(ids), "limit": "1000"}) as r:
        return (await r.json())["items"]


async def _all_settled(api: aiohttp.ClientSession, ids: list[str]) -> list[dict]:
    """The machines once none has an operation in flight (up to 3 minutes)."""
    async with asyncio.timeout(180):
        while True:
            try:
                ms = await _machines(api, ids)
            except aiohttp.ClientError:  # the gateway between two containers
                ms = []
            if len(ms) == len(ids) and all(
                m["pending"] is None
                and m["state"]
                not in ("requested", "ip_assigned", "placed", "creating", "destroying")
                for m in ms
            ):
                return ms
            await asyncio.sleep(0.5)
