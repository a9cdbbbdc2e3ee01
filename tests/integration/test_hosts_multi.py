"""Many hosts on the real stack: two provisioner agents (two host ids, their own state dirs) on
the one shared Docker engine, with ipam and the gateway on this test's vhost and database.

Each host is made to hold 3 machines (the gateway's CPU overcommit shrinks a host's 2 CPUs to
0.15, three machines of 0.05), so a batch of 5 needs both hosts and a batch of 2 past that is
more than the dc holds. Until the local datacenter has a dockerd per host, "both hosts pulled
it" means both agents answered the prewarm: they share one engine.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors
import pytest

from services.imagesync.domain import Manifest
from services.provisioner.domain import LABEL_HOST
from tests.integration.test_imagesync_support import (
    SCHEMA2,
    SECRET,
    client,
    http_session,
    registry_factory,
)
from tests.support.services import ServiceProcess
from tests.support.stack import free_port

__all__ = ["http_session", "registry_factory"]  # fixtures imported for pytest

IMAGE = "dockvm/base:bookworm"
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dvh{RUN}"  # this module's Docker networks
SPEC = {"image": IMAGE, "cpus": 0.05, "memory": "64m", "disk": "512m", "dc": "dc1"}
AGENT_ENV = {"DOCKVM_NETWORK_PREFIX": PREFIX, "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
             "DOCKVM_STOP_TIMEOUT_S": "2", "DOCKVM_RECONCILE_INTERVAL_S": "2"}  # fmt: skip
_vlans = iter(range(3150, 3160))  # this module's VLANs and subnets 10.231.50-59.0/24


def _docker() -> docker.DockerClient:
    return docker.DockerClient(base_url="unix:///var/run/docker.sock")


def _containers(hosts: list[str]) -> dict[str, str]:
    """machine id → host of the containers our agents made (the low-level list: no inspect)."""
    c = _docker()
    try:
        listed = c.api.containers(all=True, filters={"label": "dockvm.machine_id"})
    finally:
        c.close()
    return {
        x["Labels"]["dockvm.machine_id"]: x["Labels"][LABEL_HOST]
        for x in listed
        if x["Labels"].get(LABEL_HOST) in hosts
    }


def _cleanup(hosts: list[str], states: list[Path]) -> None:
    """Remove what our agents made: their containers, networks, mounts and loop devices."""
    c = _docker()
    try:
        for x in c.api.containers(all=True, filters={"label": "dockvm.machine_id"}):
            if x["Labels"].get(LABEL_HOST) in hosts:
                c.api.remove_container(x["Id"], force=True)
        for net in c.api.networks():
            if net["Name"].startswith(PREFIX):
                try:
                    c.api.remove_network(net["Id"])
                except docker.errors.APIError:
                    pass  # phantom endpoints: only a dockerd restart clears them
    finally:
        c.close()
    for state in states:
        for line in Path("/proc/self/mounts").read_text().splitlines():
            if line.split()[1].startswith(str(state)):
                subprocess.run(["umount", "-l", line.split()[1]], check=False)
        loops = subprocess.run(["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"],
                               capture_output=True, text=True, check=False).stdout  # fmt: skip
        for line in loops.splitlines():
            if str(state) in line:
                subprocess.run(["losetup", "-d", line.split()[0]], check=False)


@dataclass
class Dc:
    """An admin client of this test's gateway, its two agents and its pool's VLAN."""

    api: aiohttp.ClientSession
    vlan: int
    agents: dict[str, ServiceProcess]
    states: list[Path] = field(default_factory=list)

    async def create(self, app: str, count: int, wait: float = 180) -> tuple[int, Any]:
        body = {**SPEC, "app": app, "vlan_id": self.vlan, "count": count}
        async with self.api.post(f"/v1/machines?wait={wait}", json=body) as r:
            return r.status, await r.json()

    async def machines(self, **params: str) -> list[dict]:
        async with self.api.get("/v1/machines", params={"limit": "100", **params}) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["items"]

    async def host(self, host_id: str) -> dict:
        async with self.api.get(f"/v1/hosts/{host_id}") as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def allocated(self) -> int:
        async with self.api.get("/v1/pools") as r:
            pools = (await r.json())["pools"]
        return next(p["usage"]["allocated"] for p in pools if p["vlan_id"] == self.vlan)


@pytest.fixture
async def dc(start_service, service_env, tmp_path) -> AsyncIterator[Dc]:
    """ipam, two agents of dc1 and the gateway; a /24 pool on one of this module's VLANs."""
    vlan = next(_vlans)
    hosts = [f"mh{RUN}-{vlan}-{n}" for n in (1, 2)]
    states = [tmp_path / f"agent{n}" for n in (1, 2)]
    try:
        await start_service("ipam")
        agents = {
            host: await start_service("provisioner", "--host-id", host,
                                      env={**AGENT_ENV, "DOCKVM_STATE_DIR": str(state)})
            for host, state in zip(hosts, states, strict=True)
        }  # fmt: skip
        gateway = await start_service("gateway", env={
            "DOCKVM_OVERCOMMIT_CPU": "0.075",  # 2 CPUs x 0.075: three machines of 0.05 a host
            "DOCKVM_HOST_STALE_S": "6", "DOCKVM_HOST_DOWN_S": "8", "DOCKVM_HOST_CHECK_S": "0.5",
            "DOCKVM_PREWARM_POLICY": f"{PREFIX}/pre",
        })  # fmt: skip
        token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
        async with aiohttp.ClientSession(
            gateway.url, headers={"Authorization": f"Bearer {token}"}
        ) as api:
            n = vlan - 3100
            pool = {"name": f"mh{vlan}", "dc": "dc1", "vlan_id": vlan,
                    "cidr": f"10.231.{n}.0/24", "gateway": f"10.231.{n}.1", "cooldown_s": 0}
            async with api.post("/v1/pools", json=pool) as r:
                assert r.status == 201, await r.text()
            async with asyncio.timeout(60):
                while True:
                    async with api.get("/v1/hosts") as r:
                        seen = {h["id"]: h["status"] for h in (await r.json())["items"]}
                    if all(seen.get(h) == "online" for h in hosts):
                        break
                    await asyncio.sleep(0.2)
            yield Dc(api, vlan, agents, states)
    finally:
        _cleanup(hosts, states)


async def _until(dc: Dc, mid: str, state: str, timeout: float = 60) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            async with dc.api.get(f"/v1/machines/{mid}") as r:
                m = await r.json()
            if m["state"] == state:
                return m
            await asyncio.sleep(0.2)


async def test_a_batch_spreads_over_both_hosts_and_one_the_dc_cannot_hold_leaves_nothing(dc: Dc):
    h1, h2 = dc.agents
    status, _ = await dc.create("spread", 5)
    placed = await dc.machines(app="spread")
    per_host = {h: sum(m["host"] == h for m in placed) for h in (h1, h2)}
    before = (await dc.allocated(), _containers([h1, h2]))

    refused, problem = await dc.create("spread", 2)
    after_refusal = (await dc.allocated(), _containers([h1, h2]), await dc.machines(app="spread"))

    assert status == 202
    assert [m["state"] for m in placed] == ["running"] * 5
    assert sorted(per_host.values()) == [2, 3]  # both hosts, neither past its 3
    assert set(before[1].values()) == {h1, h2} and len(before[1]) == 5
    assert (refused, problem["reason"]) == (409, "no_capacity")
    assert "room for 1" in json.dumps(problem)
    assert after_refusal[0] == before[0] == 5  # no IP taken
    assert after_refusal[1] == before[1]  # no container
    assert len(after_refusal[2]) == 5  # no machine document


async def test_a_drained_host_takes_nothing_until_undrained(dc: Dc):
    h1, h2 = dc.agents
    async with dc.api.post(f"/v1/hosts/{h2}/drain") as r:
        drained = (r.status, await r.json())
    async with dc.api.post("/v1/hosts/no-such-host/drain") as r:
        unknown = r.status
    shown = await dc.host(h2)
    status, _ = await dc.create("drain", 3)
    on_h1 = {m["host"] for m in await dc.machines(app="drain")}
    refused, problem = await dc.create("drain", 1)
    async with dc.api.post(f"/v1/hosts/{h2}/undrain") as r:
        undrained = r.status
    status_after, _ = await dc.create("drain", 1)
    hosts_after = sorted(m["host"] for m in await dc.machines(app="drain"))
    async with dc.api.get("/v1/audit", params={"limit": "50"}) as r:
        audit = [(a["path"], a["target"]) for a in (await r.json())["items"]]

    assert drained == (200, {"host": h2, "drained": True, "changed": True})
    assert unknown == 404
    assert (shown["status"], shown["drained"]) == ("drained", True)
    assert IMAGE in shown["images"]
    assert status == 202 and on_h1 == {h1}
    assert (refused, problem["reason"]) == (409, "no_capacity")
    assert undrained == 200 and status_after == 202
    assert hosts_after == sorted([h1, h1, h1, h2])
    assert (f"/v1/hosts/{h2}/drain", h2) in audit and (f"/v1/hosts/{h2}/undrain", h2) in audit


def _tiny_image() -> tuple[bytes, bytes]:
    """A one-file image's config and gzipped layer, made without the local engine (so the
    agents must pull it)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = uuid.uuid4().bytes * 64
        info = tarfile.TarInfo("etc/dockvm-prewarm")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    layer = buf.getvalue()
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer).hexdigest()]},
    }).encode()  # fmt: skip
    return config, gzip.compress(layer)


async def test_a_push_to_the_dcs_registry_is_pulled_by_every_host_of_the_dc(
    dc: Dc, start_service, registry_factory, http_session, probe_factory
):
    h1, h2 = dc.agents
    port = free_port()
    reg = await registry_factory("dc1", f"http://127.0.0.1:{port}/v1/registry-events")
    await start_service("imagesync", port=port, env={
        "DOCKVM_REGISTRIES": f"dc1={reg.url}", "DOCKVM_WEBHOOK_SECRET": SECRET,
        "DOCKVM_RECONCILE_INTERVAL_S": "600"})  # fmt: skip
    probe = await probe_factory("image.#")
    repo, ref = f"{PREFIX}/pre", f"{reg.host}/{PREFIX}/pre:1"
    registry = client(reg, http_session)
    config, layer = _tiny_image()
    manifest = {
        "schemaVersion": 2, "mediaType": SCHEMA2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": await registry.push_blob(repo, config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "digest": await registry.push_blob(repo, layer), "size": len(layer)}],
    }  # fmt: skip
    try:
        await registry.put_manifest(repo, "1", Manifest(SCHEMA2, json.dumps(manifest).encode()))
        done = await probe.wait_for("image.prewarmed", lambda m: m.ref == ref, 120, count=2)
        c = _docker()
        try:
            present = any(ref in (i.get("RepoTags") or []) for i in c.api.images())
        finally:
            c.close()

        assert sorted(m.host for m in done) == sorted([h1, h2])
        assert [m.error for m in done] == [None, None]
        assert any(m.pulled for m in done)  # one engine: the first pull serves both
        assert present
        # It came the way a push does: the registry's webhook, imagesync's image.pushed.
        assert [(m.dc, m.repo, m.tag) for m in probe.of_type("image.pushed")] == [
            ("dc1", repo, "1")]
    finally:
        c = _docker()
        try:
            c.api.remove_image(ref, force=True)
        except docker.errors.NotFound:
            pass
        finally:
            c.close()


async def test_a_dead_host_leaves_its_machines_unreachable_then_running_with_the_same_ip(
    dc: Dc, probe_factory
):
    h1, h2 = dc.agents
    probe = await probe_factory("machine.state_changed")
    status, _ = await dc.create("dies", 2)
    machines = {m["host"]: m for m in await dc.machines(app="dies")}
    victim, survivor = machines[h2], machines[h1]
    container = _containers([h2])

    dc.agents[h2].kill()
    await dc.agents[h2].proc.wait()
    unknown = await _until(dc, victim["id"], "unreachable", timeout=60)
    down = (await dc.host(h2))["status"]
    announced = await probe.wait_for(
        "machine.state_changed",
        lambda m: m.machine_id == victim["id"] and m.to_state == "unreachable",
    )
    alive = await _until(dc, survivor["id"], "running")
    await dc.agents[h2].start()
    back = await _until(dc, victim["id"], "running", timeout=60)

    assert status == 202 and set(machines) == {h1, h2}
    assert (unknown["reason"], down) == ("host_down", "down")
    assert announced[0].host == h2
    assert alive["ip"] == survivor["ip"]
    assert (back["ip"], back["host"]) == (victim["ip"], h2)
    assert _containers([h2]) == container  # the same container: not destroyed, not remade
