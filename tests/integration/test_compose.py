"""The control plane from the dockvm image under docker-compose, the host agent outside.

`scripts/image.sh build` (cached layers) makes the image; compose/compose.sh brings gateway,
ipam, imagesync, bastion and builder up on this test's vhost, database, state dir and ports
(its own env file and compose project), so it runs beside `make run` and other tests. A
provisioner runs on the host as a subprocess, like a systemd unit would; a machine is created
and destroyed through the gateway in its container. Everything is removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import docker
import pytest

from tests.support.services import ROOT
from tests.support.stack import free_port

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


def _compose(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    out = subprocess.run(
        [str(ROOT / "compose/compose.sh"), *args], env={**os.environ, **env}, cwd=ROOT,
        capture_output=True, text=True, timeout=timeout, check=False,
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


def _cleanup_machines() -> None:
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


@pytest.fixture(scope="module")
def image() -> str:
    """dockvm/dockvm:<version>, built (or found in the layer cache) by scripts/image.sh."""
    out = subprocess.run(
        [str(ROOT / "scripts/image.sh"), "build"], cwd=ROOT, capture_output=True, text=True,
        timeout=900, check=False,
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
    env = {"DOCKVM_COMPOSE_ENV": str(env_file), "DOCKVM_IMAGE": image,
           "DOCKVM_COMPOSE_STATE": str(tmp_path / "cstate"),
           "DOCKVM_COMPOSE_SECRETS": str(tmp_path / "csecrets"), **ports}
    try:
        _compose(env, "up")
        token = (tmp_path / "cstate" / "admin.token").read_text().strip()
        url = f"http://127.0.0.1:{ports['DOCKVM_GATEWAY_PORT']}"
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(url, headers=headers) as api:
            yield Compose(project, env, api, tmp_path / "cstate", tmp_path / "csecrets")
    finally:
        try:
            _compose(env, "down", timeout=120)
        finally:
            _cleanup_machines()


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


async def test_compose_control_plane_with_a_host_agent_outside(
    compose: Compose, start_service, tmp_path
):
    health = await _wait_healthy(compose.project)
    secret_files = sorted(p.name for p in compose.secrets.iterdir())
    modes = {oct(stat.S_IMODE(p.stat().st_mode)) for p in compose.secrets.iterdir()}
    envs = [
        e for c in _project_containers(compose.project)
        for e in docker.APIClient().inspect_container(c["Id"])["Config"]["Env"]
    ]

    # The image's HEALTHCHECK passes for each; secrets are 0400 files, never container env.
    assert health == dict.fromkeys(SERVICES, "healthy")
    assert secret_files == ["DOCKVM_AMQP_URL", "DOCKVM_MONGO_URL", "DOCKVM_WEBHOOK_SECRET"]
    assert modes == {"0o400"}
    assert not [e for e in envs if e.startswith(("DOCKVM_AMQP_URL=", "DOCKVM_WEBHOOK_SECRET="))]
    assert stat.S_IMODE((compose.state / "admin.token").stat().st_mode) == 0o600

    host = f"cmp-{RUN}"
    await start_service(
        "provisioner", "--host-id", host,
        env={"DOCKVM_NETWORK_PREFIX": PREFIX, "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
             "DOCKVM_STOP_TIMEOUT_S": "2", "DOCKVM_STATE_DIR": str(tmp_path / "agent")},
    )
    api = compose.api
    n = int(RUN, 16) % 150 + 100
    pool = {"name": f"c{RUN}", "dc": "dc1", "vlan_id": 1000 + n, "cidr": f"10.234.{n}.0/24",
            "gateway": f"10.234.{n}.1", "cooldown_s": 3600}
    async with api.post("/v1/pools", json=pool) as r:
        assert r.status == 201, await r.text()
    async with asyncio.timeout(60):
        while True:
            async with api.get("/v1/hosts") as r:
                if any(h["id"] == host and h["status"] == "online"
                       for h in (await r.json())["items"]):
                    break
            await asyncio.sleep(0.3)

    spec = {"app": "compose", "image": IMAGE_BASE, "cpus": 0.5, "memory": "256m", "disk": "1g",
            "dc": "dc1", "vlan_id": 1000 + n}
    async with api.post("/v1/machines?wait=120", json=spec) as r:
        assert r.status == 202, await r.text()
        mid = (await r.json())["machines"][0]["id"]
    created = await _settled(api, mid, {"running", "failed"})
    on_engine = docker.APIClient().containers(
        all=True, filters={"label": f"dockvm.machine_id={mid}"})
    async with api.delete(f"/v1/machines/{mid}") as r:
        assert r.status == 202, await r.text()
    destroyed = await _settled(api, mid, {"destroyed", "failed"})
    left = docker.APIClient().containers(all=True, filters={"label": f"dockvm.machine_id={mid}"})

    # Created on the host agent through the containerised gateway, then destroyed.
    assert (created["state"], created["host"]) == ("running", host)
    assert len(on_engine) == 1
    assert destroyed["state"] == "destroyed"
    assert left == []
