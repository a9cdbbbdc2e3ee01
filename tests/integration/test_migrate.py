"""Cold migration on the local datacenter: ipam, the gateway and two provisioner agents, each on
its own host's engine (scripts/hosts.sh h1 and h2) and OVS bridge, on this test's vhost and
database. A machine with data in /data moves from one host to the other with its IP, MAC, SSH
host key and hostname, and nothing of it stays on the source; one whose target cannot make it
(the target's engine lacks its image and its registry has none) goes back to its source,
running, the same machine.

The hosts are the running stack's, else brought up by ``test_fabric``'s module fixture (two
hosts without agents, taken down afterwards). VLAN 3166 (10.231.66.0/24) is this module's.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import docker
import docker.errors
import pytest
from typer.testing import CliRunner

from cli import main as cli_main
from tests.integration import test_provisioner as provisioner_tests
from tests.integration.test_fabric import HOSTS_RUN, HOSTS_SH, IMAGE, _engine, _ssh_banner, fabric

__all__ = ["fabric"]  # the module fixture, imported for pytest

RUN = uuid.uuid4().hex[:6]
VLAN, NET = 3166, "10.231.66"
SPEC = {"image": IMAGE, "cpus": 0.05, "memory": "64m", "disk": "512m", "dc": "dc1",
        "vlan_id": VLAN}  # fmt: skip
# The identity a migration must keep, as the machine itself reports it.
PROBE = (
    "hostname; cat /sys/class/net/eth0/address; ip -o -4 addr show dev eth0 | awk '{print $4}'; "
    "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | awk '{print $2}'; "
    "sha256sum /data/blob | cut -d' ' -f1"
)


@dataclass
class Dc:
    """An admin client of this test's gateway and its two hosts' agents."""

    api: aiohttp.ClientSession
    hosts: dict[str, str]  # host id → engine (h1, h2)
    states: dict[str, Path]  # host id → the agent's state dir
    url: str = ""  # the gateway's

    async def create(self, app: str, image: str = IMAGE) -> dict[str, Any]:
        body = {**SPEC, "image": image, "app": app, "count": 1}
        async with self.api.post("/v1/machines?wait=180", json=body) as r:
            assert r.status == 202, await r.text()
            mid = (await r.json())["machines"][0]["id"]
        return await self.machine(mid)

    async def machine(self, mid: str) -> dict[str, Any]:
        async with self.api.get(f"/v1/machines/{mid}") as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def migrate(self, mid: str, host: str | None = None, wait: int = 300) -> tuple[int, Any]:
        body = {} if host is None else {"host": host}
        async with self.api.post(f"/v1/machines/{mid}/migrate?wait={wait}", json=body) as r:
            return r.status, await r.json()

    async def identity(self, host: str, mid: str) -> list[str]:
        """hostname, MAC, IP/prefix, host key fingerprint, /data/blob's digest (once the
        machine's init made its host keys: `running` comes with the container's start); the
        engine calls and the poll run off the event loop."""

        def probe() -> list[str]:
            _until_exec_ok(self.hosts[host], mid, "test -s /etc/ssh/ssh_host_ed25519_key.pub")
            return _exec(self.hosts[host], mid, PROBE).split()

        return await asyncio.to_thread(probe)

    def leftovers(self, host: str, mid: str) -> dict[str, Any]:
        """What ``host`` still holds of the machine: container, volume file, loop device."""
        client = _engine(self.hosts[host])
        try:
            containers = client.api.containers(all=True, filters={"name": f"dockvm-{mid}"})
        finally:
            client.close()
        img = self.states[host] / "volumes" / f"{mid}.img"
        loops = subprocess.run(["losetup", "-n", "-O", "NAME", "-j", str(img)],
                               capture_output=True, text=True, check=False).stdout  # fmt: skip
        return {"containers": len(containers), "file": img.exists(), "loops": loops.split()}


def _until_exec_ok(engine: str, mid: str, script: str, timeout: float = 60.0) -> None:
    """Poll ``script`` in the machine until it exits 0."""
    deadline = time.monotonic() + timeout
    client = _engine(engine)
    try:
        while True:
            res = client.containers.get(f"dockvm-{mid}").exec_run(["sh", "-c", script])
            if res.exit_code == 0:
                return
            assert time.monotonic() < deadline, f"{script!r} still fails in {mid}"
            time.sleep(0.2)
    finally:
        client.close()


def _exec(engine: str, mid: str, script: str) -> str:
    client = _engine(engine)
    try:
        res = client.containers.get(f"dockvm-{mid}").exec_run(["sh", "-c", script])
    finally:
        client.close()
    assert res.exit_code == 0, res.output
    return res.output.decode()


def _agent_env(engine: str, state: Path) -> dict[str, str]:
    return {
        "DOCKVM_DOCKER_URL": f"unix://{HOSTS_RUN / engine / 'docker.sock'}",
        "DOCKVM_NETWORK_DRIVER": "ovs", "DOCKVM_OVS_BRIDGE": f"dvh-{engine}",
        "DOCKVM_OVS_UPLINK": f"dvh{engine[1:]}bond", "DOCKVM_OVS_ROUTER": "dvh-tor",
        "DOCKVM_STATE_DIR": str(state), "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
        "DOCKVM_STOP_TIMEOUT_S": "2", "DOCKVM_NETWORK_PREFIX": f"dvm{RUN}",
    }  # fmt: skip


@pytest.fixture
async def dc(fabric, start_service, service_env, tmp_path) -> AsyncIterator[Dc]:
    """ipam, an agent on h1's and one on h2's engine, the gateway; a pool on VLAN 3166."""
    hosts = {f"mg{RUN}-1": "h1", f"mg{RUN}-2": "h2"}
    states = {host: tmp_path / f"agent-{engine}" for host, engine in hosts.items()}
    try:
        await start_service("ipam")
        for host, engine in hosts.items():
            await start_service("provisioner", "--host-id", host,
                                env=_agent_env(engine, states[host]))  # fmt: skip
        gateway = await start_service("gateway", env={"DOCKVM_HOST_CHECK_S": "0.5"})
        token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
        async with aiohttp.ClientSession(
            gateway.url, headers={"Authorization": f"Bearer {token}"}
        ) as api:
            pool = {"name": f"mg{RUN}", "dc": "dc1", "vlan_id": VLAN, "cidr": f"{NET}.0/24",
                    "gateway": f"{NET}.1", "cooldown_s": 0}  # fmt: skip
            async with api.post("/v1/pools", json=pool) as r:
                assert r.status == 201, await r.text()
            async with asyncio.timeout(60):
                while True:
                    async with api.get("/v1/hosts") as r:
                        seen = {h["id"]: h["status"] for h in (await r.json())["items"]}
                    if all(seen.get(h) == "online" for h in hosts):
                        break
                    await asyncio.sleep(0.2)
            dc = Dc(api, hosts, states, gateway.url)
            try:
                yield dc
            finally:
                # The agents' destroys release the machines' OVS ports, disks and files.
                async with api.get("/v1/machines", params={"limit": "100"}) as r:
                    ids = [m["id"] for m in (await r.json())["items"]]
                for mid in ids:
                    async with api.delete(f"/v1/machines/{mid}?wait=60"):
                        pass
    finally:
        for host, engine in hosts.items():
            client = _engine(engine)
            try:
                provisioner_tests._cleanup(client, states[host], f"dvm{RUN}")
            finally:
                client.close()
        await asyncio.to_thread(subprocess.run, [str(HOSTS_SH), "vlan", "del", str(VLAN)],
                                capture_output=True, check=False)  # fmt: skip


def _other(dc: Dc, host: str) -> str:
    return next(h for h in dc.hosts if h != host)


async def test_a_machine_moves_with_its_disk_and_identity_and_leaves_nothing_behind(dc: Dc):
    m = await dc.create("mig")
    mid, source = m["id"], m["host"]
    target = _other(dc, source)
    _exec(dc.hosts[source], mid, "head -c 8M /dev/urandom >/data/blob && sync")
    before = await dc.identity(source, mid)

    # Refused before anything changes: one entry for body.host, or a 404/409.
    unknown_host = await dc.migrate(mid, "no-such-host")
    same_host = await dc.migrate(mid, source)
    unknown_machine = await dc.migrate("m-no-such-machine", target)
    async with dc.api.post(f"/v1/hosts/{target}/drain") as r:
        assert r.status == 200
    drained = await dc.migrate(mid, target)
    async with dc.api.post(f"/v1/hosts/{target}/undrain") as r:
        assert r.status == 200
    untouched = await dc.machine(mid)

    status, moved = await dc.migrate(mid, target)
    assert status == 200, moved  # what follows needs the machine on its target
    after = await dc.identity(target, mid)
    shown = await dc.machine(mid)
    banner = await _ssh_banner(m["ip"])

    assert (unknown_host[0], unknown_host[1]["errors"][0]["field"]) == (422, "body.host")
    assert unknown_host[1]["errors"][0]["type"] == "unknown_host"
    assert (same_host[0], same_host[1]["errors"][0]["type"]) == (422, "same_host")
    assert unknown_machine[0] == 404
    assert (drained[0], drained[1]["reason"]) == (409, "host_unavailable")
    assert (untouched["state"], untouched["host"]) == ("running", source)
    assert untouched["pending"] is None
    assert (moved["state"], moved["source"], moved["target"]) == ("running", source, target)
    assert after == before  # hostname, MAC, IP, host key fingerprint, the data's digest
    assert before[2] == f"{m['ip']}/24"
    assert (shown["state"], shown["host"], shown["ip"]) == ("running", target, m["ip"])
    reasons = [t["reason"] or "" for t in shown["transitions"] if t["state"] == "migrating"]
    assert [r.split(" ")[0] for r in reasons] == ["migrating", "exported", "imported"]
    assert banner.startswith(b"SSH-2.0")  # its sshd answers at its IP, through the fabric
    assert dc.leftovers(source, mid) == {"containers": 0, "file": False, "loops": []}
    assert dc.leftovers(target, mid)["containers"] == 1


@pytest.fixture
def h1_only_image(dc: Dc) -> Iterator[str]:
    """The base image under a tag only h1's engine holds (and no registry has)."""
    ref = f"127.0.0.1:5001/dockvm/mig-only-h1:{RUN}"
    client = _engine("h1")
    try:
        client.api.tag(IMAGE, ref.rsplit(":", 1)[0], RUN)
        yield ref
    finally:
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_image(ref, force=False)
        client.close()


async def test_a_target_that_cannot_make_the_machine_sends_it_back_running_the_same(
    dc: Dc, h1_only_image: str
):
    source, target = (next(h for h, e in dc.hosts.items() if e == n) for n in ("h1", "h2"))
    async with dc.api.post(f"/v1/hosts/{target}/drain") as r:
        assert r.status == 200
    m = await dc.create("back", image=h1_only_image)
    async with dc.api.post(f"/v1/hosts/{target}/undrain") as r:
        assert r.status == 200
    mid = m["id"]
    _exec(dc.hosts[source], mid, "head -c 4M /dev/urandom >/data/blob && sync")
    before = await dc.identity(source, mid)

    status, problem = await dc.migrate(mid, target)
    shown = await dc.machine(mid)
    after = await dc.identity(source, mid)

    assert m["host"] == source
    assert (status, problem["reason"]) == (409, "migrate_failed")
    assert "image_not_found" in problem["detail"]
    assert (shown["state"], shown["host"], shown["ip"]) == ("running", source, m["ip"])
    assert shown["transitions"][-1]["reason"].startswith("import_failed")
    assert after == before
    assert dc.leftovers(target, mid) == {"containers": 0, "file": False, "loops": []}
    assert dc.leftovers(source, mid)["containers"] == 1


async def test_evacuating_a_drained_host_moves_a_stopped_machine_stopped_with_its_data(
    dc: Dc, service_env
):
    source, target = (next(h for h, e in dc.hosts.items() if e == n) for n in ("h1", "h2"))
    async with dc.api.post(f"/v1/hosts/{target}/drain") as r:
        assert r.status == 200
    m = await dc.create("evac")
    mid = m["id"]
    async with dc.api.post(f"/v1/hosts/{target}/undrain") as r:
        assert r.status == 200
    _exec(dc.hosts[source], mid, "head -c 4M /dev/urandom >/data/blob && sync")
    before = await dc.identity(source, mid)
    async with dc.api.post(f"/v1/machines/{mid}/stop?wait=60") as r:
        assert r.status == 200, await r.text()
    async with dc.api.post(f"/v1/hosts/{source}/drain") as r:
        assert r.status == 200

    token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
    env = {"DOCKVM_URL": dc.url, "DOCKVM_TOKEN": token}
    res = await asyncio.to_thread(
        CliRunner().invoke, cli_main.app, ["host", "evacuate", source, "--timeout", "300"], env=env
    )
    assert res.exit_code == 0, res.output  # what follows needs the machine on its target
    moved = await dc.machine(mid)
    async with dc.api.post(f"/v1/machines/{mid}/start?wait=60") as r:
        started = r.status
    after = await dc.identity(target, mid)

    assert f"{mid}: moved {source} → {target}, stopped" in res.output
    assert (moved["state"], moved["host"]) == ("stopped", target)
    assert started == 200
    assert after == before
    assert dc.leftovers(source, mid) == {"containers": 0, "file": False, "loops": []}
