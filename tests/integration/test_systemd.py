"""A systemd machine on the real stack (gateway, ipam, an agent, the monitor): over SSH it
behaves as ops expect of a VM (systemctl, journalctl, cron, hostnamectl, /etc/hosts, nproc,
free, top, uptime), a reboot inside brings it back as it was and the gateway records a reboot,
a poweroff inside stops it (and a later start works), and both dockvm's stop and ``docker stop``
shut systemd down cleanly (exit 0, not SIGKILL's 137).

One machine is made and reused through the whole story, so the module stays under 3 minutes.
Every machine, network, loop device and volume made here is removed at the end.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncssh
import docker
import pytest

from tests.integration.test_e2e import _delete_all
from tests.support.subnets import free_24

pytestmark = pytest.mark.integration

IMAGE = os.environ.get("DOCKVM_SYSTEMD_IMAGE", "dockvm/base-systemd:bookworm")
RUN = uuid.uuid4().hex[:6]
HOST = f"sd-{RUN}"
PREFIX = f"dvs{RUN}"
KEY = asyncssh.generate_private_key("ssh-ed25519")
STOP_TIMEOUT_S = 20


@dataclass
class Stack:
    """The running services, an admin client of the gateway and this run's pool."""

    api: aiohttp.ClientSession
    vlan: int

    def spec(self, **over: object) -> dict:
        """A machine spec on this run's pool, reachable with KEY."""
        return {
            "app": "sd", "image": IMAGE, "cpus": 1, "memory": "256m", "disk": "1g",
            "dc": "dc1", "vlan_id": self.vlan,
            "ssh_keys": [KEY.export_public_key().decode().strip()], "direct_ssh": True, **over,
        }  # fmt: skip

    async def machine(self, mid: str) -> dict:
        """The machine as the gateway shows it, with its transitions."""
        async with self.api.get(f"/v1/machines/{mid}") as r:
            return await r.json()

    async def until(self, mid: str, cond, timeout: float = 60) -> dict:
        """The machine once ``cond(machine)`` holds."""
        async with asyncio.timeout(timeout):
            while not cond(m := await self.machine(mid)):
                await asyncio.sleep(0.3)
        return m

    async def act(self, mid: str, action: str) -> int:
        """Start or stop the machine through the gateway; the HTTP status."""
        async with self.api.post(f"/v1/machines/{mid}/{action}?wait=60") as r:
            assert r.status in (200, 202), await r.text()
            return r.status


@pytest.fixture
async def stack(start_service, service_env, tmp_path) -> AsyncIterator[Stack]:
    """ipam, one agent, its monitor and the gateway, with a fresh pool on a VLAN of this run."""
    n = free_24(100, 250)
    vlan = 2000 + n
    state = tmp_path / HOST
    try:
        await start_service("ipam")
        await start_service(
            "provisioner", "--host-id", HOST,
            env={"DOCKVM_NETWORK_PREFIX": PREFIX, "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
                 "DOCKVM_STOP_TIMEOUT_S": str(STOP_TIMEOUT_S), "DOCKVM_STATE_DIR": str(state)},
        )  # fmt: skip
        await start_service("monitor", "--host-id", HOST)
        gateway = await start_service("gateway")
        token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
        async with aiohttp.ClientSession(
            gateway.url, headers={"Authorization": f"Bearer {token}"}
        ) as api:
            pool = {"name": f"sd{n}", "dc": "dc1", "vlan_id": vlan, "cidr": f"10.234.{n}.0/24",
                    "gateway": f"10.234.{n}.1", "cooldown_s": 3600}  # fmt: skip
            async with api.post("/v1/pools", json=pool) as r:
                assert r.status == 201, await r.text()
            await _hosts_online_one(api)
            try:
                yield Stack(api, vlan)
            finally:
                await _delete_all(api)
    finally:
        _cleanup_run([state])


def _cleanup_run(states: list[Path]) -> None:
    """Remove what this run made even when the gateway could not: containers on this run's
    networks, the networks, the agent's loop devices and mounts."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        nets = [n for n in client.api.networks() if n["Name"].startswith(PREFIX)]
        for net in nets:
            for cid in client.api.inspect_network(net["Id"]).get("Containers") or {}:
                client.api.remove_container(cid, force=True)
        for state in states:
            for line in Path("/proc/self/mounts").read_text().splitlines():
                if line.split()[1].startswith(str(state)):
                    subprocess.run(["umount", "-l", line.split()[1]], check=False)
            out = subprocess.run(["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"],
                                 capture_output=True, text=True, check=False).stdout
            for line in out.splitlines():
                if str(state) in line:
                    subprocess.run(["losetup", "-d", line.split()[0]], check=False)
        for net in nets:
            client.api.remove_network(net["Id"])
    finally:
        client.close()


async def _hosts_online_one(api: aiohttp.ClientSession) -> None:
    async with asyncio.timeout(60):
        while True:
            async with api.get("/v1/hosts") as r:
                if any(h["id"] == HOST and h["status"] == "online"
                       for h in (await r.json())["items"]):  # fmt: skip
                    return
            await asyncio.sleep(0.2)


async def _connect(ip: str, timeout: float = 90) -> asyncssh.SSHClientConnection:
    """An SSH connection to root@ip, once sshd answers."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await asyncssh.connect(
                    ip, username="root", client_keys=[KEY], known_hosts=None,
                    agent_path=None, connect_timeout=5,
                )  # fmt: skip
            except (OSError, asyncssh.Error):
                await asyncio.sleep(0.3)


async def _run(ip: str, command: str) -> str:
    """``command``'s stdout on the machine (a failure fails the test with its stderr)."""
    async with await _connect(ip) as conn:
        out = await conn.run(command)
    assert out.exit_status == 0, f"{command!r} exited {out.exit_status}: {out.stderr}"
    return str(out.stdout).strip()


async def _host_key(ip: str) -> bytes:
    async with await _connect(ip) as conn:
        key = conn.get_server_host_key()
    assert key is not None
    return key.public_data


async def _fire_and_forget(ip: str, command: str) -> None:
    """Run ``command`` (a reboot, a poweroff) without waiting for an answer that cannot come."""
    async with await _connect(ip) as conn:
        try:
            async with asyncio.timeout(10):
                await conn.run(command)
        except (TimeoutError, asyncssh.Error, OSError):
            pass


def _container(mid: str) -> dict:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        return client.api.inspect_container(f"dockvm-{mid}")
    finally:
        client.close()


def _docker_stop(mid: str, timeout: int) -> None:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=timeout + 30)
    try:
        client.api.stop(f"dockvm-{mid}", timeout=timeout)
    finally:
        client.close()


async def _until_container(mid: str, cond, timeout: float = 60) -> dict:
    async with asyncio.timeout(timeout):
        while not cond(c := _container(mid)):
            await asyncio.sleep(0.3)
    return c


async def test_a_bad_init_is_refused_with_422(stack: Stack):
    async with stack.api.post("/v1/machines", json=stack.spec(init="upstart")) as r:
        status, body = r.status, await r.json()

    assert status == 422
    assert [e["field"] for e in body["errors"]] == ["init"]


async def test_a_systemd_machine_lives_like_a_vm(stack: Stack):
    async with stack.api.post("/v1/machines?wait=120", json=stack.spec()) as r:
        assert r.status == 202, await r.text()
        mid = (await r.json())["machines"][0]["id"]
    m = await stack.machine(mid)
    ip, hostname = m["ip"], m["hostname"]
    c = _container(mid)
    # No init in the create: the image's dockvm.init label chose systemd.
    assert (m["state"], c["Config"]["Labels"].get("dockvm.init")) == ("running", "systemd")
    assert c["HostConfig"]["Privileged"] is False
    assert c["HostConfig"]["CapAdd"] and "SYS_ADMIN" not in c["HostConfig"]["CapAdd"]

    # A cron job, every minute: it fires while the rest is checked.
    await _run(ip, "echo '* * * * * root date >> /root/cron.out' > /etc/cron.d/dvtest")
    running = await _run(ip, "systemctl is-system-running --wait || systemctl --failed")
    status = await _run(ip, "systemctl status sshd --no-pager")
    pid1 = await _run(ip, "systemctl show -p MainPID --value cron")
    await _run(ip, "systemctl restart cron")
    pid2 = await _run(ip, "systemctl show -p MainPID --value cron")
    cron_active = await _run(ip, "systemctl is-active cron")
    journal = await _run(ip, "journalctl -u ssh --no-pager")
    static = await _run(ip, "hostnamectl --static")
    hosts = await _run(ip, "cat /etc/hosts")
    nproc = await _run(ip, "nproc")
    mem = await _run(ip, "free -b | awk '/^Mem:/ {print $2}'")
    top = await _run(ip, "top -bn1 | grep 'MiB Mem'")
    up = float(await _run(ip, "cut -d' ' -f1 /proc/uptime"))
    try:
        async with asyncio.timeout(75):
            while not (await _run(ip, "cat /root/cron.out 2>/dev/null || true")):
                await asyncio.sleep(2)
    except TimeoutError:
        pytest.fail("no cron job ran in 75 s: " + await _run(ip, "journalctl -u cron -n 20"))

    assert running == "running"
    assert "Active: active (running)" in status
    assert (cron_active, pid2 != pid1) == ("active", True)
    assert "Accepted publickey for root" in journal
    assert static == hostname
    assert f"{ip}\t{hostname}" in hosts
    assert nproc == "1"  # its 1 CPU, not the host's
    assert int(mem) == 256 << 20
    assert "256.0 total" in top
    assert 0 < up < 150  # since the machine started, not the host

    # A reboot inside: back with the same IP, host key and data; the gateway says rebooted.
    key = await _host_key(ip)
    await _run(ip, "echo kept > /root/kept && echo kept > /data/kept && touch /run/booted")
    await _fire_and_forget(ip, "systemctl reboot")
    await _until_container(mid, lambda c: c["RestartCount"] >= 1 and c["State"]["Running"])
    after = await _run(ip, "cat /root/kept /data/kept; ls /run/booted 2>/dev/null || echo fresh")
    m = await stack.until(mid, lambda m: (m["reason"] or "").startswith("rebooted"))

    assert after.split() == ["kept", "kept", "fresh"]
    assert await _host_key(ip) == key
    assert (m["state"], m["reason"]) == ("running", "rebooted (exit 129)")
    assert "stopped" not in [t["state"] for t in m["transitions"]]

    # A poweroff inside: stopped for good (the restart policy leaves an exit 0 alone).
    await _fire_and_forget(ip, "poweroff")
    m = await stack.until(mid, lambda m: m["state"] == "stopped")
    c = _container(mid)
    assert (c["State"]["Status"], c["State"]["ExitCode"]) == ("exited", 0)

    # A later start works; dockvm's stop and docker stop both end in systemd's clean exit
    # (143: stopped from outside), and being manual stops, the restart policy leaves them.
    await stack.act(mid, "start")
    assert await _run(ip, "systemctl is-system-running --wait") == "running"
    await stack.act(mid, "stop")
    c = await _until_container(mid, lambda c: not c["State"]["Running"])
    assert c["State"]["ExitCode"] == 143
    await stack.act(mid, "start")
    await _run(ip, "systemctl is-system-running --wait")
    _docker_stop(mid, STOP_TIMEOUT_S)
    c = _container(mid)  # Docker applies the policy at the exit: "restarting" if it would
    assert (c["State"]["Status"], c["State"]["ExitCode"]) == ("exited", 143)
