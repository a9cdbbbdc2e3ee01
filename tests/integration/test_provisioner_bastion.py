"""The machine's side of the bastion, end to end: a real provisioner process on the real bus and
Docker Engine, machines from dockvm/base with their real sshd.

- a machine trusts a certificate signed by the bastion's user CA (the key file the agent is
  given) for the certificate's principal, and refuses the user's plain key;
- a ``direct_ssh`` (break-glass) machine takes the plain key, and answers any source;
- SSH from another container on the machine's network is reset, while the host (the network's
  gateway, where a host-local bastion connects from) gets in;
- the rule comes back after the container crashes and Docker restarts it (a fresh network
  namespace), and after a restart through the agent;
- with the real bastion (whose CA the agent was given): through it the user gets in, straight to
  the machine's IP with her own key she does not.

Every container, network and volume a test makes carries this run's prefix and is removed
afterwards, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import docker
import docker.errors
import pytest

from libs.common.bus import AmqpPublisher, RpcClient, connect, host_key
from libs.common.clock import utcnow
from libs.common.contracts import Command, Message
from libs.common.contracts.bastion import MACHINE_CA_PATH, GrantAdd, GrantInfo, UserAdd
from libs.common.contracts.provisioner import ContainerCreate, ContainerDestroy, ContainerRestart
from services.bastion.keys import load_keys
from tests.support.probe import BusProbe
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

pytestmark = pytest.mark.integration

IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dvb{RUN}"
# A VLAN and subnet of this run only (Docker refuses a second network on the same subnet).
_OCTET = random.randint(10, 250)
VLAN = 3500 + _OCTET
SUBNET = f"10.236.{_OCTET}"
NETWORK = f"{PREFIX}-vlan{VLAN}"
_HOSTS = iter(range(10, 250))

CA = asyncssh.generate_private_key("ssh-ed25519")
USER = asyncssh.generate_private_key("ssh-ed25519")
# What the bastion signs per connection, with the login as principal. Made at import, which in
# the full suite is many minutes before these tests run: valid for a day, not the bastion's minutes.
CERT = CA.generate_user_certificate(USER, "alice", principals=["root"], valid_before="+1d")
OTHER_PRINCIPAL = CA.generate_user_certificate(USER, "alice", principals=["admin"])
STRANGER_CA = asyncssh.generate_private_key("ssh-ed25519")
FOREIGN_CERT = STRANGER_CA.generate_user_certificate(USER, "alice", principals=["root"])

# Run in a container on the machine's network: one line saying how port 22 answered.
_PROBE = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], 22), timeout=5)
    print("banner" if s.recv(64).startswith(b"SSH-") else "open")
except ConnectionRefusedError:
    print("refused")
except OSError as err:
    print("error", err)
"""


def _docker() -> docker.DockerClient:
    return docker.DockerClient(base_url="unix:///var/run/docker.sock")


@dataclass
class Agent:
    """One provisioner process on its own vhost and state directory; the bastion's state dir
    holds the module's CA (a bastion started on it signs with that CA)."""

    host_id: str
    proc: ServiceProcess
    publisher: AmqpPublisher
    probe: BusProbe
    amqp_url: str
    connection: Any
    bastion_state: Path

    async def send(self, cmd: Command) -> None:
        """Publish a host command to this agent."""
        await self.publisher.publish(cmd, routing_key=host_key(self.host_id, cmd.TYPE))

    async def _any(self, types: tuple[str, ...], machine_id: str) -> Message:
        async with asyncio.timeout(90):
            while True:
                for _, env in list(self.probe.received):
                    m = env.parse()
                    if env.type in types and getattr(m, "machine_id", None) == machine_id:
                        return m
                await asyncio.sleep(0.05)

    async def destroy(self, machine_id: str) -> None:
        """Destroy a machine and wait until it is gone (its VLAN network may go with it: a
        create meanwhile could find it gone)."""
        await self.send(ContainerDestroy(machine_id=machine_id, timeout_s=2))
        await self._any(("container.destroyed", "container.action_failed"), machine_id)

    async def create(self, **overrides: object) -> tuple[str, str]:
        """Create a machine on this run's network; return its id and IP once it runs."""
        mid = f"{PREFIX}-{uuid.uuid4().hex[:8]}"
        ip = f"{SUBNET}.{next(_HOSTS)}"
        fields: dict[str, object] = {
            "machine_id": mid, "app": "web", "image": IMAGE, "cpus": 0.5, "memory": "128m",
            "disk": "320m", "ip": ip, "prefix_len": 24, "gateway": f"{SUBNET}.1",
            "vlan_id": VLAN, "hostname": "m1",
            "ssh_authorized_keys": [USER.export_public_key().decode()],
        }  # fmt: skip
        fields.update(overrides)
        await self.send(ContainerCreate.model_validate(fields))
        created = await self._any(("container.created", "container.create_failed"), mid)
        assert created.TYPE == "container.created", created
        return mid, ip


def _cleanup(client: docker.DockerClient, state: Path) -> None:
    """Remove what this run made: containers, mounts, loop devices, the network."""
    for c in client.api.containers(all=True):
        names = [n.lstrip("/") for n in c.get("Names") or []]
        mid = (c.get("Labels") or {}).get("dockvm.machine_id", "")
        if mid.startswith(PREFIX) or any(n.startswith(f"dockvm-{PREFIX}") or
                                         n.startswith(PREFIX) for n in names):  # fmt: skip
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_container(c["Id"], force=True)
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if line.split()[1].startswith(str(state))]
    for mnt in mounts:
        subprocess.run(["umount", "-l", mnt], check=False)
    out = subprocess.run(["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"], capture_output=True,
                         text=True, check=False).stdout  # fmt: skip
    for line in out.splitlines():
        if str(state) in line:
            subprocess.run(["losetup", "-d", line.split()[0]], check=False)
    for net in client.networks.list(names=[PREFIX]):
        if net.name.startswith(PREFIX):
            with contextlib.suppress(docker.errors.APIError):
                net.remove()


@pytest.fixture(scope="module")
async def agent(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Agent]:
    """A bridge/xfs agent trusting this module's CA, with the default source (the gateway)."""
    tmp = tmp_path_factory.mktemp("bastion-agent")
    # The bastion's own state, with the module's CA as its user CA: the agent is given the
    # public key file the bastion writes, as in the local stack.
    bastion_state = tmp / "bastion-state"
    (bastion_state / "bastion").mkdir(parents=True, mode=0o700)
    CA.write_private_key(bastion_state / "bastion" / "user_ca")
    ca_file = load_keys(bastion_state).ca_public_path
    vhost = await create_vhost()
    conn = await connect(vhost.url, name="dockvm-tests")
    publisher = AmqpPublisher(conn, source="tests")
    probe = await BusProbe(conn, ["container.#"]).start()
    state = tmp / "state"
    host_id = f"h-{uuid.uuid4().hex[:8]}"
    env = {
        "DOCKVM_AMQP_URL": vhost.url,
        "DOCKVM_MONGO_URL": MONGO_URL,
        "DOCKVM_MONGO_DB": f"test_{uuid.uuid4().hex[:12]}",
        "DOCKVM_STATE_DIR": str(state),
        "DOCKVM_NETWORK_PREFIX": PREFIX,
        "DOCKVM_STOP_TIMEOUT_S": "2",
        "DOCKVM_BASTION_CA_PUBKEY": str(ca_file),
    }
    proc = ServiceProcess("provisioner", env, free_port(), ["--host-id", host_id],
                          log_path=tmp / "agent.log")  # fmt: skip
    client = _docker()
    try:
        await proc.start()
        yield Agent(host_id, proc, publisher, probe, vhost.url, conn, bastion_state)
    finally:
        proc.kill()
        if proc.proc is not None:
            await proc.proc.wait()
        _cleanup(client, state)
        client.close()
        await probe.close()
        await publisher.close()
        await conn.close()
        await delete_vhost(vhost)


@pytest.fixture
async def machine(agent: Agent) -> AsyncIterator[tuple[str, str]]:
    """A machine without direct SSH: the bastion's CA is its only way in."""
    mid, ip = await agent.create()
    yield mid, ip
    await agent.destroy(mid)


async def _login(ip: str, key: object, timeout: float = 30.0) -> str:
    """Log in as root with ``key`` (a key or a (key, certificate) pair), once sshd answers;
    return ``id -un``. A refusal is raised at once."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                async with asyncssh.connect(
                    ip, username="root", client_keys=[key], known_hosts=None, connect_timeout=5
                ) as conn:
                    return str((await conn.run("id -un", check=True)).stdout).strip()
            except asyncssh.PermissionDenied:
                raise
            except (OSError, asyncssh.Error):
                await asyncio.sleep(0.2)


def _from_neighbour(ip: str) -> str:
    """How port 22 of ``ip`` answers a container of this run on the machine's network."""
    client = _docker()
    try:
        out = client.containers.run(
            IMAGE, ["-c", _PROBE, ip], entrypoint="python3", network=NETWORK,
            name=f"{PREFIX}-probe-{uuid.uuid4().hex[:6]}", remove=True,
        )  # fmt: skip
        return out.decode().strip()
    finally:
        client.close()


def _from_itself(mid: str) -> str:
    """How port 22 of the machine answers the machine itself, on loopback."""
    client = _docker()
    try:
        res = client.api.exec_create(f"dockvm-{mid}", ["python3", "-c", _PROBE, "127.0.0.1"])
        return client.api.exec_start(res["Id"]).decode().strip()
    finally:
        client.close()


def _pid(mid: str) -> int:
    client = _docker()
    try:
        state = client.api.inspect_container(f"dockvm-{mid}")["State"]
        return int(state["Pid"]) if state["Running"] else 0
    finally:
        client.close()


def _has_guard(pid: int) -> bool:
    res = subprocess.run(["nsenter", "-t", str(pid), "-n", "nft", "list", "table", "inet",
                          "dockvm_ssh"], capture_output=True, check=False)  # fmt: skip
    return res.returncode == 0


async def _guarded_anew(mid: str, old_pid: int, timeout: float = 30.0) -> int:
    """Wait until the machine runs in a new process (a new namespace) that has the guard."""
    async with asyncio.timeout(timeout):
        while True:
            pid = _pid(mid)
            if pid and pid != old_pid and _has_guard(pid):
                return pid
            await asyncio.sleep(0.1)


# ---- trust: the bastion's CA, not people ------------------------------------------------------


async def test_a_certificate_from_the_bastion_ca_logs_in_and_the_plain_key_is_refused(machine):
    mid, ip = machine

    who = await _login(ip, (USER, CERT))
    with pytest.raises(asyncssh.PermissionDenied):
        await _login(ip, USER)
    with pytest.raises(asyncssh.PermissionDenied):
        await _login(ip, (USER, FOREIGN_CERT))
    with pytest.raises(asyncssh.PermissionDenied):
        await _login(ip, (USER, OTHER_PRINCIPAL))
    bound = _docker().api.inspect_container(f"dockvm-{mid}")["Mounts"]

    assert who == "root"
    assert [m["Destination"] for m in bound if m["Destination"] == MACHINE_CA_PATH] == [
        MACHINE_CA_PATH]  # fmt: skip


async def test_direct_ssh_takes_the_plain_key_and_answers_any_source(agent):
    mid, ip = await agent.create(direct_ssh=True)
    try:
        who = await _login(ip, USER)
        seen = await asyncio.to_thread(_from_neighbour, ip)
    finally:
        await agent.destroy(mid)

    assert who == "root"
    assert seen == "banner"


# ---- the source: only the bastion's address ----------------------------------------------------


async def test_ssh_from_another_container_is_refused_while_the_host_gets_in(machine):
    mid, ip = machine

    who = await _login(ip, (USER, CERT))
    seen = await asyncio.to_thread(_from_neighbour, ip)
    itself = await asyncio.to_thread(_from_itself, mid)

    assert who == "root"
    assert seen == "refused"
    assert itself == "banner"


async def test_the_rule_comes_back_after_a_crash_and_after_a_restart(agent, machine):
    mid, ip = machine
    await _login(ip, (USER, CERT))
    first = _pid(mid)
    assert _has_guard(first)

    # A crash: PID 1 dies, Docker's restart policy starts it in a fresh network namespace.
    os.kill(first, signal.SIGKILL)
    after_crash = await _guarded_anew(mid, first)
    crash_seen = await asyncio.to_thread(_from_neighbour, ip)
    crash_who = await _login(ip, (USER, CERT))

    await agent.send(ContainerRestart(machine_id=mid, timeout_s=2))
    await _guarded_anew(mid, after_crash)
    restart_seen = await asyncio.to_thread(_from_neighbour, ip)
    restart_who = await _login(ip, (USER, CERT))

    assert (crash_seen, crash_who) == ("refused", "root")
    assert (restart_seen, restart_who) == ("refused", "root")


# ---- through the real bastion -----------------------------------------------------------------


async def test_through_the_bastion_the_user_gets_in_and_straight_to_the_ip_she_does_not(
    agent: Agent, machine: tuple[str, str], mongo_db: Any, db_name: str, tmp_path: Path
):
    mid, ip = machine
    await _login(ip, (USER, CERT))  # sshd is up: what follows tests the path, not its start
    now = utcnow()
    # The machine as the gateway describes it to the bastion.
    await mongo_db["machine_summaries"].replace_one({"_id": mid}, {
        "_id": mid, "type": "docker", "app": "web", "state": "running", "reason": None,
        "image": IMAGE, "cpus": 0.5, "memory": 1, "disk": 1, "dc": "dc1", "vlan_id": VLAN,
        "hostname": "m1", "ip": ip, "host": agent.host_id, "created_at": now,
        "updated_at": now, "pending": None}, upsert=True)  # fmt: skip
    ssh_port = free_port()
    bastion = ServiceProcess("bastion", {
        "DOCKVM_AMQP_URL": agent.amqp_url, "DOCKVM_MONGO_URL": MONGO_URL,
        "DOCKVM_MONGO_DB": db_name, "DOCKVM_STATE_DIR": str(agent.bastion_state),
        "DOCKVM_BASTION_SSH_PORT": str(ssh_port)}, free_port(),
        log_path=tmp_path / "bastion.log")  # fmt: skip
    rpc = RpcClient(agent.connection, source="tests")
    try:
        await bastion.start()
        await rpc.request(UserAdd(name="alice", ssh_keys=[USER.export_public_key().decode()]))
        grant = await rpc.request(GrantAdd(user="alice", machine_id=mid, ttl_s=600))
        async with asyncssh.connect(
            "127.0.0.1", ssh_port, username="alice", client_keys=[USER], known_hosts=None,
            agent_path=None, connect_timeout=15,
        ) as conn:  # fmt: skip
            through = await conn.run(f"root@{ip} id -un")
            # The machine's host keys are replaced behind the platform's back: the bastion,
            # which pinned what the agent read at the first session, refuses it.
            new_key = await _replace_host_keys(mid, ip)
            replaced = await conn.run(f"root@{ip} id -un")
        with pytest.raises(asyncssh.PermissionDenied):
            await _login(ip, USER)
        pinned = await mongo_db["bastion_host_keys"].find_one({"_id": mid})
    finally:
        await rpc.close()
        await bastion.stop()

    assert isinstance(grant, GrantInfo)
    assert (through.exit_status, through.stdout) == (0, "root\n"), through.stderr
    assert pinned is not None and new_key not in pinned["keys"]
    assert any(k.startswith("ssh-ed25519 ") for k in pinned["keys"])
    assert replaced.exit_status == 1
    assert "presented a host key that is not its own" in str(replaced.stderr)


async def _replace_host_keys(mid: str, ip: str, timeout: float = 30.0) -> str:
    """New host keys in the machine, sshd reloaded; return the new ed25519 key once served."""
    client = _docker()
    try:
        script = ("rm -f /etc/ssh/ssh_host_*; ssh-keygen -A >/dev/null; "
                  "pkill -HUP -o -x sshd; cat /etc/ssh/ssh_host_ed25519_key.pub")  # fmt: skip
        res = client.api.exec_create(f"dockvm-{mid}", ["sh", "-c", script])
        new = " ".join(client.api.exec_start(res["Id"]).decode().split()[:2])
    finally:
        client.close()
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(OSError, asyncssh.Error):
                served = await asyncssh.get_server_host_key(
                    ip, server_host_key_algs=["ssh-ed25519"]
                )
                if served is not None and served.export_public_key().decode().startswith(new):
                    return new
            await asyncio.sleep(0.2)


async def _ca_in_machine(mid: str, timeout: float = 30.0) -> str:
    """The machine's CA file, once it holds a key."""
    client = _docker()
    try:
        async with asyncio.timeout(timeout):
            while True:
                res = client.api.exec_create(f"dockvm-{mid}", ["cat", MACHINE_CA_PATH])
                text = client.api.exec_start(res["Id"]).decode().strip()
                if text.startswith("ssh-"):
                    return text
                await asyncio.sleep(0.2)
    finally:
        client.close()


async def test_an_agent_without_the_ca_file_gets_the_key_from_the_bastion(
    agent: Agent, mongo_db: Any, db_name: str, tmp_path: Path
):
    bastion = ServiceProcess("bastion", {
        "DOCKVM_AMQP_URL": agent.amqp_url, "DOCKVM_MONGO_URL": MONGO_URL,
        "DOCKVM_MONGO_DB": db_name, "DOCKVM_STATE_DIR": str(agent.bastion_state),
        "DOCKVM_BASTION_SSH_PORT": str(free_port())}, free_port(),
        log_path=tmp_path / "bastion.log")  # fmt: skip
    # A second agent, as on a host without the bastion: its CA file is not there.
    env = {**agent.proc.env, "DOCKVM_BASTION_CA_PUBKEY": str(tmp_path / "not-here.pub"),
           "DOCKVM_STATE_DIR": str(tmp_path / "state2"), "DOCKVM_RECONCILE_INTERVAL_S": "1"}
    host_id = f"h-{uuid.uuid4().hex[:8]}"
    other = ServiceProcess("provisioner", env, free_port(), ["--host-id", host_id],
                           log_path=tmp_path / "agent2.log")  # fmt: skip
    second = Agent(host_id, other, agent.publisher, agent.probe, agent.amqp_url,
                   agent.connection, agent.bastion_state)  # fmt: skip
    mid = None
    try:
        await bastion.start()
        await other.start()
        mid, ip = await second.create()
        in_machine = await _ca_in_machine(mid)
        who = await _login(ip, (USER, CERT))
    finally:
        if mid is not None:
            await second.destroy(mid)
        other.kill()
        await bastion.stop()
        _cleanup(_docker(), tmp_path / "state2")

    assert in_machine.split()[:2] == CA.export_public_key().decode().split()[:2]
    assert who == "root"
