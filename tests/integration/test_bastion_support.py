"""Shared fixtures of the bastion's integration tests (no tests here); a test module imports
``bastion_fixture``, ``box_fixture`` and ``bastion_state_fixture``.

A real machine: a container from the base image on a bridge network of the module's own, whose
sshd trusts the bastion's user CA (written into it here, as the provisioner will do), and no
authorized key. A real bastion process per test, on the test's vhost and database, whose state
dir (and so its CA) is the module's. The machine is described to the bastion the way the
gateway does, by a ``machine_summaries`` document.
"""

from __future__ import annotations

import io
import socket
import tarfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import docker
import pytest

from libs.common.bus import RpcClient
from libs.common.clock import utcnow
from libs.common.contracts import Message
from libs.common.contracts.bastion import MACHINE_CA_PATH, GrantAdd, UserAdd
from services.bastion.keys import load_keys
from tests.support.probe import BusProbe
from tests.support.services import ServiceProcess
from tests.support.stack import free_port

IMAGE = "dockvm/base:bookworm"
TEST_LABEL = "dockvm.bastiontest"
SSH_CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID", "SYS_CHROOT", "KILL",
            "AUDIT_WRITE", "NET_BIND_SERVICE"]
ALICE = asyncssh.generate_private_key("ssh-ed25519")
MALLORY = asyncssh.generate_private_key("ssh-ed25519")


@dataclass
class Box:
    """The machine container."""

    id: str
    name: str
    ip: str
    machine_id: str
    hostname: str = "web-1"
    app: str = "web"
    host_keys: list[str] = field(default_factory=list)


def read_host_keys(client: docker.DockerClient, cid: str) -> list[str]:
    """The machine's ed25519 host public key, as its sshd serves it (the platform's record)."""
    stream, _ = client.api.get_archive(cid, "/etc/ssh/ssh_host_ed25519_key.pub")
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.extractfile(tar.getmembers()[0])
        assert member is not None
        return [" ".join(member.read().decode().split()[:2])]


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _port_open(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module", name="bastion_state")
def bastion_state_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's bastion state dir, with its keys made once."""
    state = tmp_path_factory.mktemp("bastion") / "state"
    load_keys(state)
    return state


@pytest.fixture(scope="module", name="box")
def box_fixture(bastion_state: Path) -> Iterator[Box]:
    """A running machine whose sshd trusts the bastion's CA; removed afterwards."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    run = uuid.uuid4().hex[:10]
    net = f"bastiontest-{run}"
    client.api.create_network(net, driver="bridge", labels={TEST_LABEL: run})
    ca = (bastion_state / "bastion" / "user_ca.pub").read_bytes()
    conf = f"TrustedUserCAKeys {MACHINE_CA_PATH}\n".encode()
    cid = client.api.create_container(
        IMAGE, name=net, labels={TEST_LABEL: run}, hostname="web-1",
        host_config=client.api.create_host_config(
            network_mode=net, cap_drop=["ALL"], cap_add=SSH_CAPS
        ),
    )["Id"]
    try:
        client.api.put_archive(cid, "/etc/ssh", _tar({
            Path(MACHINE_CA_PATH).name: ca, "sshd_config.d/00-bastion-ca.conf": conf,
        }))
        client.api.start(cid)
        ip = client.api.inspect_container(cid)["NetworkSettings"]["Networks"][net]["IPAddress"]
        deadline = time.monotonic() + 30
        while not _port_open(ip, 22):
            assert time.monotonic() < deadline, client.api.logs(cid)[-500:]
            time.sleep(0.1)
        yield Box(cid, net, ip, f"m-bt{run}", host_keys=read_host_keys(client, cid))
    finally:
        client.api.remove_container(cid, force=True)
        client.api.remove_network(net)
        client.close()


@dataclass
class Bastion:
    """A bastion process and what a test talks to it with."""

    proc: ServiceProcess
    ssh_port: int
    rpc: RpcClient
    probe: BusProbe
    db: Any
    box: Box
    state: Path
    started: list[Any] = field(default_factory=list)

    async def call(self, msg: Message) -> Message:
        """One RPC to the bastion."""
        return await self.rpc.request(msg, timeout=15)

    async def connect(self, user: str = "alice", key: asyncssh.SSHKey = ALICE,
                      **kw: Any) -> asyncssh.SSHClientConnection:
        """An SSH connection to the bastion as ``user``."""
        return await asyncssh.connect(
            "127.0.0.1", self.ssh_port, username=user, client_keys=[key], known_hosts=None,
            agent_path=None, connect_timeout=15, **kw,
        )

    async def grant(self, user: str = "alice", **kw: Any) -> Message:
        """Grant ``user`` root on the box (by default), for an hour."""
        fields = {"machine_id": self.box.machine_id, "ttl_s": 3600, **kw}
        return await self.call(GrantAdd(user=user, **fields))

    def target(self, login: str = "root") -> str:
        """The box as a target word."""
        return f"{login}@{self.box.ip}"


async def summary(db: Any, box: Box, **over: Any) -> None:
    """Describe a machine the way the gateway does (``machine_summaries``), with its host keys
    when the box has them."""
    now = utcnow()
    if box.host_keys:
        over = {"host_keys": box.host_keys, **over}
    doc = {"_id": box.machine_id, "type": "docker", "app": box.app, "state": "running",
           "reason": None, "image": IMAGE, "cpus": 1.0, "memory": 1, "disk": 1, "dc": "dc1",
           "vlan_id": 1, "hostname": box.hostname, "ip": box.ip, "host": "local1",
           "created_at": now, "updated_at": now, "pending": None, **over}
    await db["machine_summaries"].replace_one({"_id": doc["_id"]}, doc, upsert=True)


@pytest.fixture(name="bastion")
async def bastion_fixture(
    start_service: Callable[..., Any], box: Box, bastion_state: Path, amqp: Any, mongo_db: Any,
    probe_factory: Callable[..., Any],
) -> AsyncIterator[Bastion]:
    """A bastion on this test's vhost and database, alice registered, the box described."""
    ssh_port = free_port()
    probe = await probe_factory("session.#", "transfer.done", "command.blocked")
    proc = await start_service("bastion", env={
        "DOCKVM_STATE_DIR": str(bastion_state), "DOCKVM_BASTION_SSH_PORT": str(ssh_port),
    })
    rpc = RpcClient(amqp, source="tests")
    await summary(mongo_db, box)
    b = Bastion(proc, ssh_port, rpc, probe, mongo_db, box, bastion_state)
    await b.call(UserAdd(name="alice", ssh_keys=[ALICE.export_public_key().decode()]))
    yield b
    await rpc.close()
