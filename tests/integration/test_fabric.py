"""The local datacenter's fabric (scripts/hosts.sh): machines on two Docker hosts, joined by each
host's OVS bridge, its active-backup bonded trunk and the top-of-rack bridge.

Machines here are containers of this run on the hosts' own engines, attached by the provisioner's
real ovs driver (``OvsNetwork.plumb``) to their host's bridge, as the agents attach theirs. The
tests use VLANs 3160-3162 (10.231.60-62.0/24), which the fabric carries from the start.

The last test makes machines through two real provisioner agents (own vhost and database) on h1
and h2, which add VLAN 3164 to their trunks and its gateway port themselves.

The stack's hosts h1 and h2 are used when up (``make test`` brings up 3, without agents). When
none is (``DOCKVM_HOSTS=1``), the module fixture brings up two hosts without agents (about
15 s) and takes them down afterwards; ``DOCKVM_FABRIC_TESTS=0`` skips the module instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import docker
import pytest

from libs.common.contracts.provisioner import ContainerDestroy
from services.provisioner.adapters.network import OvsNetwork
from services.provisioner.adapters.runtime import ContainerInfo
from services.provisioner.domain import (
    LABEL_GATEWAY,
    LABEL_IP,
    LABEL_PREFIX,
    LABEL_VLAN,
    mac_address,
)
from tests.integration import test_provisioner as provisioner_tests
from tests.integration.test_provisioner import Agent

REPO = Path(__file__).resolve().parents[2]
HOSTS_SH = REPO / "scripts" / "hosts.sh"
HOSTS_RUN = Path(os.environ.get("DOCKVM_HOSTS_RUN", "/run/dockvm/hosts"))
IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
RUN = uuid.uuid4().hex[:6]
LABEL_RUN = "dockvm.test-fabric"


def _sh(*args: str, check: bool = True) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=120).stdout


def _engine(host: str) -> docker.DockerClient:
    return docker.DockerClient(base_url=f"unix://{HOSTS_RUN / host / 'docker.sock'}", timeout=60)


def _engine_up(host: str) -> bool:
    if not (HOSTS_RUN / host / "docker.sock").exists():
        return False
    try:
        client = _engine(host)
        ok = bool(client.ping())
        client.close()
    except docker.errors.DockerException:
        return False
    return ok and f"dvh-{host}\n" in _sh("ovs-vsctl", "--timeout=5", "list-br", check=False)


@pytest.fixture(scope="module")
def fabric() -> Iterator[None]:
    """Two hosts on the fabric: the running stack's, else two started here and removed after."""
    if _engine_up("h1") and _engine_up("h2"):
        yield
        return
    if os.environ.get("DOCKVM_FABRIC_TESTS") == "0":
        pytest.skip("no multi-host stack (DOCKVM_HOSTS=1) and DOCKVM_FABRIC_TESTS=0")
    if subprocess.run(["ovs-vsctl", "--timeout=5", "show"], capture_output=True).returncode:
        pytest.skip("Open vSwitch is not running: scripts/stack.sh up starts it")
    env = {**os.environ, "DOCKVM_HOSTS": "2", "DOCKVM_HOSTS_AGENTS": "0"}
    try:
        subprocess.run([str(HOSTS_SH), "up"], env=env, check=True, timeout=180,
                       capture_output=True, text=True)  # fmt: skip
    except subprocess.CalledProcessError as err:
        pytest.fail(f"scripts/hosts.sh up failed: {err.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run([str(HOSTS_SH), "down"], env=env, check=False, timeout=300,
                       capture_output=True)  # fmt: skip


@dataclass
class Machine:
    """A container of this run on one host, plumbed into the fabric."""

    host: str
    machine_id: str
    ip: str
    vlan: int
    container: Any

    @property
    def name(self) -> str:
        """The container's name."""
        return f"dvf{RUN}-{self.machine_id}"


class Fabric:
    """Makes machines on the hosts' engines and removes every one of them afterwards."""

    def __init__(self) -> None:
        self.machines: list[Machine] = []
        self.clients: dict[str, docker.DockerClient] = {}

    def client(self, host: str) -> docker.DockerClient:
        """The engine of ``host``."""
        if host not in self.clients:
            self.clients[host] = _engine(host)
        return self.clients[host]

    async def machine(self, host: str, ip: str, vlan: int) -> Machine:
        """A running container with ``ip`` on ``vlan``, attached by the ovs driver."""
        mid = f"{RUN}{len(self.machines)}"
        labels = {LABEL_IP: ip, LABEL_PREFIX: "24", LABEL_VLAN: str(vlan),
                  LABEL_GATEWAY: ip.rsplit(".", 1)[0] + ".1", LABEL_RUN: RUN}  # fmt: skip
        c = await asyncio.to_thread(
            self.client(host).containers.run, IMAGE, ["sleep", "infinity"], detach=True,
            name=f"dvf{RUN}-{mid}", network_mode="none", labels=labels, init=True,
        )  # fmt: skip
        m = Machine(host, mid, ip, vlan, c)
        self.machines.append(m)
        await self.plumb(m)
        return m

    async def plumb(self, m: Machine) -> None:
        """Attach ``m``'s current network namespace to its host's bridge."""
        c = m.container
        await asyncio.to_thread(c.reload)
        info = ContainerInfo(
            id=c.id, name=m.name, machine_id=m.machine_id, labels=c.labels,
            state="running", started_at=None, pid=c.attrs["State"]["Pid"],
            cpus=1.0, memory=0, image=IMAGE, network="none",
        )  # fmt: skip
        await OvsNetwork(f"dvh-{m.host}").plumb(info)

    async def exec(self, m: Machine, *cmd: str) -> tuple[int, str]:
        """Run ``cmd`` in ``m``; its exit code and output."""
        res = await asyncio.to_thread(m.container.exec_run, list(cmd))
        return res.exit_code, res.output.decode(errors="replace")

    async def close(self) -> None:
        """Remove this run's containers and their OVS ports."""
        for m in self.machines:
            await asyncio.to_thread(m.container.remove, force=True)
            await OvsNetwork(f"dvh-{m.host}").release(m.machine_id, m.vlan)
            # The next run reuses the IP with another MAC (machine ids differ): the root
            # namespace's ARP entry would point at a gone port for a minute.
            subprocess.run(["ip", "neigh", "del", m.ip, "dev", f"dvhgw{m.vlan}"],  # noqa: ASYNC221
                           capture_output=True, check=False)  # fmt: skip
        for client in self.clients.values():
            client.close()


@pytest.fixture
async def fab(fabric: None) -> Fabric:
    f = Fabric()
    try:
        yield f
    finally:
        await f.close()


async def _pings(fab: Fabric, src: Machine, ip: str, count: int = 1) -> bool:
    code, _ = await fab.exec(src, "ping", "-c", str(count), "-W", "1", "-q", ip)
    return code == 0


async def _tcp(fab: Fabric, client: Machine, server: Machine) -> str:
    """A TCP exchange from ``client`` to an echo server started on ``server``:7000."""
    srv = ("import socket\ns = socket.create_server(('', 7000))\nwhile True:\n"
           "    c, _ = s.accept(); c.sendall(c.recv(64).upper()); c.close()\n")  # fmt: skip
    await asyncio.to_thread(
        server.container.exec_run,
        ["python3", "-c", srv],
        detach=True,
    )
    cli = ("import socket, sys, time\n"
           "for _ in range(50):\n"
           "    try: s = socket.create_connection((sys.argv[1], 7000), timeout=2); break\n"
           "    except OSError: time.sleep(0.1)\n"
           "s.sendall(b'hello'); print(s.recv(64).decode())\n")  # fmt: skip
    _, out = await fab.exec(client, "python3", "-c", cli, server.ip)
    return out.strip()


async def _wait_ping(fab: Fabric, src: Machine, ip: str, timeout: float = 20) -> bool:
    async with asyncio.timeout(timeout):
        while not await _pings(fab, src, ip):
            await asyncio.sleep(0.2)
    return True


async def test_one_vlan_across_hosts_reaches_two_vlans_do_not(fab):
    a = await fab.machine("h1", "10.231.60.11", 3160)
    b = await fab.machine("h2", "10.231.60.12", 3160)

    await _wait_ping(fab, a, b.ip)
    echoed = await _tcp(fab, a, b)
    # Same subnet on another VLAN: only the VLAN keeps them apart (no router in between).
    c_same_subnet = await fab.machine("h2", "10.231.60.14", 3161)
    other_vlan = await _pings(fab, a, c_same_subnet.ip, count=3)
    # The root namespace (the control plane's) reaches machines through the gateway port.
    reader, writer = await asyncio.wait_for(asyncio.open_connection(b.ip, 7000), 5)
    writer.write(b"root")
    from_root = await asyncio.wait_for(reader.read(64), 5)
    writer.close()

    assert echoed == "HELLO"
    assert other_vlan is False
    assert from_root == b"ROOT"


async def test_ip_and_mac_survive_a_restart_of_the_hosts_engine_container(fab):
    a = await fab.machine("h1", "10.231.62.21", 3162)
    b = await fab.machine("h2", "10.231.62.22", 3162)
    await _wait_ping(fab, a, b.ip)

    # A restart gives b a new network namespace; the driver plumbs it again, same address.
    await asyncio.to_thread(b.container.restart, timeout=1)
    await fab.plumb(b)
    await _wait_ping(fab, a, b.ip)
    _, link = await fab.exec(b, "ip", "-o", "link", "show", "eth0")
    _, neigh = await fab.exec(a, "ip", "neigh", "show", b.ip)

    assert mac_address(b.machine_id) in link
    assert mac_address(b.machine_id) in neigh


async def test_ip_and_mac_survive_a_restart_of_the_engine(fab):
    a = await fab.machine("h1", "10.231.62.41", 3162)
    b = await fab.machine("h2", "10.231.62.42", 3162)
    await _wait_ping(fab, a, b.ip)

    # The whole engine of h2 goes down (its containers with it) and comes back.
    await asyncio.to_thread(_sh, str(HOSTS_SH), "engine", "h2", "stop")
    await asyncio.to_thread(_sh, str(HOSTS_SH), "engine", "h2", "start")
    fab.clients.pop("h2").close()
    b.container = await asyncio.to_thread(fab.client("h2").containers.get, b.name)
    await asyncio.to_thread(b.container.start)
    await fab.plumb(b)
    await _wait_ping(fab, a, b.ip)
    _, addr = await fab.exec(b, "ip", "-o", "addr", "show", "dev", "eth0")
    _, link = await fab.exec(b, "ip", "-o", "link", "show", "eth0")

    assert f" {b.ip}/24 " in addr
    assert mac_address(b.machine_id) in link


async def test_the_agents_driver_carries_a_new_vlan_and_its_gateway(fab):
    vlan, net = 3163, IPv4Network("10.231.63.0/24")
    try:
        for host in ("h1", "h2"):
            driver = OvsNetwork(f"dvh-{host}", uplink=f"dvh{host[1:]}bond", router="dvh-tor")
            await driver.prepare(vlan, net, IPv4Address("10.231.63.1"))
        a = await fab.machine("h1", "10.231.63.11", vlan)
        b = await fab.machine("h2", "10.231.63.12", vlan)
        reached = await _wait_ping(fab, a, b.ip)
        trunk = _sh("ovs-vsctl", "get", "port", "dvh1bond", "trunks")
        gw = _sh("ip", "-o", "-4", "addr", "show", "dev", f"dvhgw{vlan}")
    finally:
        await asyncio.to_thread(_sh, str(HOSTS_SH), "vlan", "del", str(vlan), check=False)

    assert reached is True
    assert str(vlan) in trunk
    assert " 10.231.63.1/24 " in gw


def _active_member(bond: str) -> str:
    out = _sh("ovs-appctl", "bond/show", bond)
    found = re.search(r"member (\S+): enabled\n\s+active member", out)
    assert found, out
    return found.group(1)


async def test_bond_failover_moves_traffic_to_the_backup_uplink(fab, capsys):
    a = await fab.machine("h1", "10.231.60.31", 3160)
    b = await fab.machine("h2", "10.231.60.32", 3160)
    await _wait_ping(fab, a, b.ip)
    active = _active_member("dvh1bond")
    interval, count = 0.01, 400

    ping = asyncio.create_task(fab.exec(a, "ping", "-i", str(interval), "-c", str(count),
                                        "-W", "1", "-q", b.ip))  # fmt: skip
    try:
        await asyncio.sleep(1.0)
        _sh("ip", "link", "set", active, "down")
        _, out = await ping
        after = _active_member("dvh1bond")
        # Still reachable with the old uplink down: the backup carries the traffic now.
        still = await _pings(fab, a, b.ip)
    finally:
        if not ping.done():
            ping.cancel()
        _sh("ip", "link", "set", active, "up")

    sent, received = map(int, re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
    lost = sent - received
    with capsys.disabled():
        print(
            f"\nbond failover: {lost} of {sent} packets lost, "
            f"recovery <= {lost * interval * 1000:.0f} ms (ping every {interval * 1000:.0f} ms)"
        )

    assert after != active
    assert received > sent // 2
    assert still is True


# ---- the hosts' own agents: machines made through the bus, on the fabric -----------------------


async def _fabric_agent(tmp: Path, host: str) -> AsyncIterator[Agent]:
    """A provisioner on ``host``'s engine and bridge, on a vhost and database of its own."""
    env = {"DOCKVM_DOCKER_URL": f"unix://{HOSTS_RUN / host / 'docker.sock'}",
           "DOCKVM_NETWORK_DRIVER": "ovs", "DOCKVM_OVS_BRIDGE": f"dvh-{host}",
           "DOCKVM_OVS_UPLINK": f"dvh{host[1:]}bond", "DOCKVM_OVS_ROUTER": "dvh-tor"}  # fmt: skip
    client = _engine(host)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        async for agent in provisioner_tests._agent(tmp, **env):
            try:
                yield agent
            finally:
                # The agent's destroys release the OVS ports; the shared cleanup only knows
                # the main engine, so this engine's containers go here.
                for mid in agent.machines:
                    await agent.send(ContainerDestroy(machine_id=mid, timeout_s=2))
                with contextlib.suppress(TimeoutError):
                    await agent.wait(("container.destroyed",), count=len(agent.machines))
    finally:
        provisioner_tests._cleanup(client, tmp / "state", provisioner_tests.PREFIX)
        client.close()


async def test_machines_made_by_two_hosts_agents_reach_each_other_and_survive_an_engine_restart(
    fabric, tmp_path
):
    vlan, gw = 3164, "10.231.64.1"
    net = {"vlan_id": vlan, "gateway": gw, "prefix_len": 24}
    try:
        async for a1 in _fabric_agent(tmp_path / "h1", "h1"):
            async for a2 in _fabric_agent(tmp_path / "h2", "h2"):
                m1, m2 = a1.machine_id(), a2.machine_id()
                c1 = await a1.create(m1, ip="10.231.64.11", **net)
                c2 = await a2.create(m2, ip="10.231.64.12", **net)
                assert (c1.TYPE, c2.TYPE) == ("container.created",) * 2, (c1, c2)
                h1 = _engine("h1")
                box = Machine("h1", m1, "10.231.64.11", vlan, h1.containers.get(f"dockvm-{m1}"))
                fab = Fabric()
                crossed = await _wait_ping(fab, box, "10.231.64.12", timeout=30)
                banner = await _ssh_banner("10.231.64.12")

                # h2's engine goes down with its machine and comes back: the engine restarts
                # the machine (unless-stopped), the agent sees the start and plumbs it again.
                await asyncio.to_thread(_sh, str(HOSTS_SH), "engine", "h2", "stop")
                await asyncio.to_thread(_sh, str(HOSTS_SH), "engine", "h2", "start")
                back = await _wait_ping(fab, box, "10.231.64.12", timeout=60)
                _, neigh = await fab.exec(box, "ip", "neigh", "show", "10.231.64.12")
                h1.close()
    finally:
        await asyncio.to_thread(_sh, str(HOSTS_SH), "vlan", "del", str(vlan), check=False)

    assert crossed is True
    assert banner.startswith(b"SSH-2.0")
    assert back is True
    assert mac_address(m2) in neigh


async def _ssh_banner(ip: str, timeout: float = 30) -> bytes:
    """The first bytes of ``ip``:22, from the root namespace through the VLAN's gateway port,
    once the machine's sshd listens."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                reader, writer = await asyncio.open_connection(ip, 22)
            except OSError:
                await asyncio.sleep(0.3)
                continue
            try:
                return await reader.read(7)
            finally:
                writer.close()


# From dc1's registry: the hosts' engines hold only the base image (hosts.sh engine_image).
SYSTEMD_IMAGE = "127.0.0.1:5001/" + os.environ.get(
    "DOCKVM_SYSTEMD_IMAGE", "dockvm/base-systemd:bookworm"
)


async def test_a_systemd_machine_comes_back_when_its_engine_restarts(fabric, tmp_path):
    vlan, ip = 3165, "10.231.65.12"
    net = {"vlan_id": vlan, "gateway": "10.231.65.1", "prefix_len": 24}
    try:
        async for agent in _fabric_agent(tmp_path / "h2", "h2"):
            mid = agent.machine_id()
            created = await agent.create(mid, image=SYSTEMD_IMAGE, ip=ip, **net)
            assert created.TYPE == "container.created", created
            engine = _engine("h2")
            before = engine.api.inspect_container(f"dockvm-{mid}")
            engine.close()
            booted = await _ssh_banner(ip, timeout=90)

            # The engine stops its containers on the way down (systemd exits 143) and starts
            # the non-zero on-failure ones when it comes back; a poweroff inside (exit 0) not.
            await asyncio.to_thread(_sh, str(HOSTS_SH), "engine", "h2", "stop")
            await asyncio.to_thread(_sh, str(HOSTS_SH), "engine", "h2", "start")
            back = await _ssh_banner(ip, timeout=120)
            engine = _engine("h2")
            after = engine.api.inspect_container(f"dockvm-{mid}")
            engine.close()
    finally:
        await asyncio.to_thread(_sh, str(HOSTS_SH), "vlan", "del", str(vlan), check=False)

    assert before["Config"]["Labels"].get("dockvm.init") == "systemd"
    assert booted.startswith(b"SSH-2.0")
    assert back.startswith(b"SSH-2.0")
    assert after["Id"] == before["Id"]  # the same container, started again by the engine
    assert after["State"]["Running"] is True
    assert after["State"]["StartedAt"] > before["State"]["StartedAt"]
