"""The provisioner agent end to end: a real `python -m services.provisioner` process on the real
bus, Docker Engine, loop devices, XFS, LXCFS and OVS, with machines made from dockvm/base.

Every machine, network, volume, loop device and OVS bridge a test makes carries this run's
prefix and is removed afterwards, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
import docker
import docker.errors
import pytest

from libs.common.bus import AmqpPublisher, connect, host_key
from libs.common.contracts import Command, Message
from libs.common.contracts.provisioner import (
    ContainerCreate,
    ContainerDestroy,
    ContainerResize,
    ContainerStart,
    ContainerStop,
    ImagePrewarm,
)
from libs.common.contracts.releases import Artifact, Deploy, HealthCheck
from tests.support.probe import BusProbe
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dvt{RUN}"  # Docker networks, machine ids and the OVS bridge of this run
RESULT_TYPES = ("container.created", "container.create_failed")


def _docker() -> docker.DockerClient:
    return docker.DockerClient(base_url="unix:///var/run/docker.sock")


def _loops_of(state: Path) -> list[str]:
    """Loop devices backed by a file under ``state``."""
    out = subprocess.run(["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return [line.split()[0] for line in out.splitlines() if str(state) in line]


def _mounts_under(state: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(state))]


def _cleanup(client: docker.DockerClient, state: Path, machine_prefix: str) -> None:
    """Remove everything this run made: containers, mounts, loop devices, networks."""
    # The low-level list: the high-level one inspects each container afterwards, and another
    # agent of this module may remove one in between (a 404 in teardown, not a failure of ours).
    for c in client.api.containers(all=True, filters={"label": "dockvm.machine_id"}):
        if c["Labels"].get("dockvm.machine_id", "").startswith(machine_prefix):
            with contextlib.suppress(docker.errors.NotFound):
                client.api.remove_container(c["Id"], force=True)
    for mnt in _mounts_under(state):
        subprocess.run(["umount", "-l", mnt], check=False)
    for dev in _loops_of(state):
        subprocess.run(["losetup", "-d", dev], check=False)
    for net in client.networks.list(names=[f"{PREFIX}"]):
        if net.name.startswith(PREFIX):
            net.remove()


@dataclass
class Agent:
    """One agent process on its own vhost, database and state directory."""

    host_id: str
    state: Path
    env: dict[str, str]
    publisher: AmqpPublisher
    probe: BusProbe
    log_dir: Path
    proc: ServiceProcess | None = None
    machines: list[str] = field(default_factory=list)

    async def start(self) -> Agent:
        """Start (or restart) the agent and wait until it is ready."""
        n = len(list(self.log_dir.glob("agent-*.log")))
        self.proc = ServiceProcess(
            "provisioner",
            self.env,
            free_port(),
            ["--host-id", self.host_id],
            log_path=self.log_dir / f"agent-{n}.log",
        )
        await self.proc.start()
        return self

    async def send(self, cmd: Command, id: str | None = None) -> None:
        """Publish a host command to this agent."""
        await self.publisher.publish(cmd, routing_key=host_key(self.host_id, cmd.TYPE), id=id)

    async def wait(
        self, types: tuple[str, ...], machine_id: str | None = None, count: int = 1,
        where: Callable[[Message], bool] = lambda _: True, timeout: float = 60.0,
    ) -> list[Message]:  # fmt: skip
        """Wait for ``count`` events of ``types`` (about ``machine_id``) and return them."""

        def matching() -> list[Message]:
            out = []
            for _, env in list(self.probe.received):
                if env.type in types:
                    m = env.parse()
                    about = machine_id is None or getattr(m, "machine_id", None) == machine_id
                    if about and where(m):
                        out.append(m)
            return out

        async with asyncio.timeout(timeout):
            while len(matching()) < count:
                await asyncio.sleep(0.05)
        return matching()

    def machine_id(self) -> str:
        """A fresh machine id of this run."""
        mid = f"{PREFIX}-{uuid.uuid4().hex[:8]}"
        self.machines.append(mid)
        return mid

    async def create(self, mid: str, **overrides: object) -> Message:
        """Send a create for ``mid`` and return its result event."""
        await self.send(create_cmd(mid, **overrides))
        return (await self.wait(RESULT_TYPES, mid))[0]


_SUBNETS = iter(range(10, 250))


def create_cmd(mid: str, **overrides: object) -> ContainerCreate:
    """A create for a small machine on the bridge VLAN of this module."""
    fields: dict[str, object] = {
        "machine_id": mid,
        "app": "web",
        "image": IMAGE,
        "cpus": 1,
        "memory": "256m",
        "disk": "512m",
        "ip": f"10.231.1.{next(_SUBNETS)}",
        "prefix_len": 24,
        "gateway": "10.231.1.1",
        "vlan_id": 3101,
        "hostname": "m1",
        "ssh_authorized_keys": [KEY.export_public_key().decode()],
        "direct_ssh": True,  # these tests log in with the key itself (break-glass)
        "labels": {"team": "ops"},
    }
    fields.update(overrides)
    return ContainerCreate.model_validate(fields)


KEY = asyncssh.generate_private_key("ssh-ed25519")


async def _agent(tmp: Path, **env: str) -> AsyncIterator[Agent]:
    vhost = await create_vhost()
    conn = await connect(vhost.url, name="dockvm-tests")
    publisher = AmqpPublisher(conn, source="tests")
    probe = await BusProbe(conn, ["container.#", "host.heartbeat", "image.#", "deploy.#"]).start()
    state = tmp / "state"
    host_id = f"h-{uuid.uuid4().hex[:8]}"
    agent = Agent(
        host_id=host_id,
        state=state,
        env={
            "DOCKVM_AMQP_URL": vhost.url,
            "DOCKVM_MONGO_URL": MONGO_URL,
            "DOCKVM_MONGO_DB": f"test_{uuid.uuid4().hex[:12]}",
            "DOCKVM_STATE_DIR": str(state),
            "DOCKVM_NETWORK_PREFIX": PREFIX,
            "DOCKVM_STOP_TIMEOUT_S": "5",
            **env,
        },
        publisher=publisher,
        probe=probe,
        log_dir=tmp,
    )
    client = _docker()
    try:
        yield await agent.start()
    finally:
        if agent.proc is not None:
            agent.proc.kill()
            if agent.proc.proc is not None:
                await agent.proc.proc.wait()
        _cleanup(client, state, PREFIX)
        client.close()
        await probe.close()
        await publisher.close()
        await conn.close()
        await delete_vhost(vhost)


@pytest.fixture(scope="module")
async def agent(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Agent]:
    """The bridge/xfs agent shared by this module's lifecycle tests."""
    async for a in _agent(tmp_path_factory.mktemp("agent"), DOCKVM_HEARTBEAT_INTERVAL_S="1"):
        yield a


@pytest.fixture
async def machine(agent: Agent) -> AsyncIterator[tuple[str, Message]]:
    """One running machine, destroyed after the test."""
    mid = agent.machine_id()
    created = await agent.create(mid)
    assert created.TYPE == "container.created", created
    yield mid, created
    await agent.send(ContainerDestroy(machine_id=mid, timeout_s=2))
    await agent.wait(("container.destroyed",), mid)


async def _ssh(ip: str) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        ip, username="root", client_keys=[KEY], known_hosts=None, connect_timeout=10
    )


async def _ssh_ready(ip: str, timeout: float = 30.0) -> asyncssh.SSHClientConnection:
    async with asyncio.timeout(timeout):
        while True:
            try:
                return await _ssh(ip)
            except (OSError, asyncssh.Error):
                await asyncio.sleep(0.2)


async def _sh(ip: str, command: str) -> str:
    async with await _ssh_ready(ip) as conn:
        result = await conn.run(command, check=True)
        return str(result.stdout)


def _inspect(mid: str) -> dict:
    client = _docker()
    try:
        return client.api.inspect_container(f"dockvm-{mid}")
    finally:
        client.close()


def _dockvm_containers(mid: str) -> list:
    client = _docker()
    try:
        return client.containers.list(all=True, filters={"label": f"dockvm.machine_id={mid}"})
    finally:
        client.close()


# ---- 1. create: a long-running, hardened container ------------------------------------------


async def test_create_makes_a_hardened_long_running_container(machine):
    mid, created = machine
    attrs = _inspect(mid)
    hc = attrs["HostConfig"]

    assert attrs["Id"] == created.container_id
    assert attrs["State"]["Running"] is True
    assert attrs["Config"]["Labels"]["dockvm.machine_id"] == mid
    assert attrs["Config"]["Labels"]["dockvm.app"] == "web"
    assert attrs["Config"]["Labels"]["dockvm.ip"] == str(created.ip)
    assert attrs["Config"]["Hostname"] == "m1"
    assert hc["RestartPolicy"]["Name"] == "unless-stopped"
    assert hc["Privileged"] is False
    assert hc["CapDrop"] == ["ALL"]
    assert "SYS_ADMIN" not in hc["CapAdd"] and "SETUID" in hc["CapAdd"]
    assert hc["NetworkMode"] == f"{PREFIX}-vlan3101"
    assert hc["PidMode"] == "" and hc["IpcMode"] != "host"
    assert hc["Memory"] == 256 << 20 and hc["MemorySwap"] == 256 << 20
    assert hc["PidsLimit"] == 4096
    assert hc["CpuQuota"] == 100_000
    assert not [b for b in hc["Binds"] if "docker.sock" in b]
    assert attrs["NetworkSettings"]["Networks"][hc["NetworkMode"]]["IPAddress"] == str(created.ip)


# ---- 2, 3. sshd with the key, and the machine's own limits inside ---------------------------


async def test_ssh_with_the_key_works_and_free_shows_the_memory_limit(machine):
    _, created = machine
    ip = str(created.ip)

    out = await _sh(ip, "id -u; hostname; free -m | awk '/^Mem:/ {print $2}'; "
                    "findmnt -n -o FSTYPE /data; nproc; "
                    "grep -c ^processor /proc/cpuinfo")  # fmt: skip

    uid, hostname, mem_total, fstype, nproc, cpuinfo = out.split()
    assert (uid, hostname, fstype) == ("0", "m1", "xfs")
    assert mem_total == "256"
    assert (nproc, cpuinfo) == ("1", "1")


async def test_password_login_is_refused(machine):
    _, created = machine
    await _ssh_ready(str(created.ip))
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(str(created.ip), username="root", password="root",
                               client_keys=None, known_hosts=None, connect_timeout=10)  # fmt: skip


# ---- 4, 5. live resize, online disk growth --------------------------------------------------


async def test_live_resize_changes_limits_without_restart(agent, machine):
    mid, created = machine
    before = _inspect(mid)["State"]["StartedAt"]

    await agent.send(ContainerResize(machine_id=mid, cpus=0.5, memory="512m"))
    resized = (await agent.wait(("container.resized", "container.resize_failed"), mid))[0]
    attrs = _inspect(mid)
    mem_total = await _sh(str(created.ip), "free -m | awk '/^Mem:/ {print $2}'")

    assert resized.TYPE == "container.resized", resized
    assert (resized.cpus, resized.memory) == (0.5, 512 << 20)
    assert attrs["State"]["StartedAt"] == before
    assert attrs["HostConfig"]["CpuQuota"] == 50_000
    assert attrs["HostConfig"]["MemorySwap"] == 512 << 20
    assert mem_total.strip() == "512"


async def test_disk_grows_online_and_df_shows_it_at_once(agent, machine):
    mid, created = machine
    ip = str(created.ip)
    before = int(await _sh(ip, "df -B1 --output=size /data | tail -1"))

    await agent.send(ContainerResize(machine_id=mid, disk="1g"))
    resized = (await agent.wait(("container.resized", "container.resize_failed"), mid))[0]
    after = int(await _sh(ip, "df -B1 --output=size /data | tail -1"))

    assert resized.TYPE == "container.resized", resized
    assert resized.disk == 1 << 30
    assert before < 512 << 20 < after <= 1 << 30


@pytest.mark.parametrize(
    ("change", "reason"),
    [({"disk": "400m"}, "disk_shrink_refused"), ({"cpus": 500}, "cpus_exhausted"),
     ({"memory": "2t"}, "memory_exhausted")],
)  # fmt: skip
async def test_harmful_resize_is_refused_and_changes_nothing(agent, machine, change, reason):
    mid, _ = machine
    before = _inspect(mid)["HostConfig"]

    await agent.send(ContainerResize(machine_id=mid, **change))
    failed = (await agent.wait(("container.resized", "container.resize_failed"), mid))[0]
    after = _inspect(mid)["HostConfig"]

    assert failed.TYPE == "container.resize_failed"
    assert failed.reason == reason
    assert (after["Memory"], after["CpuQuota"]) == (before["Memory"], before["CpuQuota"])


async def test_memory_below_usage_is_refused_unless_forced(agent, machine):
    mid, created = machine
    # 60 MiB of tmpfs is memory the machine really uses (the page cache would not count).
    await _sh(str(created.ip), "dd if=/dev/zero of=/dev/shm/fill bs=1M count=60 status=none")

    await agent.send(ContainerResize(machine_id=mid, memory="100m"))
    refused = (await agent.wait(("container.resized", "container.resize_failed"), mid))[0]
    await agent.send(ContainerResize(machine_id=mid, memory="160m", force=True))
    forced = (await agent.wait(("container.resized", "container.resize_failed"), mid, count=2))[1]

    assert refused.TYPE == "container.resize_failed"
    assert refused.reason == "memory_below_usage"
    assert forced.TYPE == "container.resized", forced
    assert _inspect(mid)["HostConfig"]["Memory"] == 160 << 20


# ---- 6. stop/start keeps the IP and the host keys -------------------------------------------


async def test_stop_start_keeps_ip_and_host_keys(agent, machine):
    mid, created = machine
    ip = str(created.ip)
    async with await _ssh_ready(ip) as conn:
        key_before = conn.get_server_host_key().export_public_key()

    actions = ("container.action_done", "container.action_failed")
    await agent.send(ContainerStop(machine_id=mid, timeout_s=5))
    stopped = (await agent.wait(actions, mid))[0]
    await agent.send(ContainerStart(machine_id=mid))
    started = (await agent.wait(actions, mid, count=2))[1]
    async with await _ssh_ready(ip) as conn:
        key_after = conn.get_server_host_key().export_public_key()
        inside_ip = (await conn.run("hostname -I", check=True)).stdout

    assert (stopped.TYPE, started.TYPE) == ("container.action_done",) * 2, (stopped, started)
    assert (stopped.state, started.state) == ("exited", "running")
    assert key_after == key_before
    assert inside_ip.split() == [ip]


# ---- 7. destroy leaves nothing ---------------------------------------------------------------


async def test_destroy_leaves_no_container_volume_loop_device_or_network(agent):
    mid = agent.machine_id()
    created = await agent.create(mid)
    assert created.TYPE == "container.created"

    await agent.send(ContainerDestroy(machine_id=mid, timeout_s=2))
    await agent.wait(("container.destroyed",), mid)
    client = _docker()
    networks = [n.name for n in client.networks.list(names=[f"{PREFIX}-vlan3101"])]
    client.close()

    assert _dockvm_containers(mid) == []
    assert not (agent.state / "volumes" / f"{mid}.img").exists()
    assert not (agent.state / "volumes" / "mnt" / mid).exists()
    assert [d for d in _loops_of(agent.state) if mid in d] == []
    assert [m for m in _mounts_under(agent.state) if mid in m] == []
    assert networks in ([], [f"{PREFIX}-vlan3101"])  # kept only while other machines use it


async def test_destroys_at_once_leave_the_vlans_network_dropped_by_the_last(agent):
    """Only the last destroy of a VLAN in flight tries to drop its network; it still goes."""
    vlan, net = 3107, f"{PREFIX}-vlan3107"
    mids = [agent.machine_id() for _ in range(3)]
    ips = [f"10.231.7.{10 + i}" for i in range(3)]
    made = (agent.create(m, vlan_id=vlan, ip=ip, gateway="10.231.7.1")
            for m, ip in zip(mids, ips, strict=True))
    created = await asyncio.gather(*made)
    client = _docker()
    before = [n.name for n in client.networks.list(names=[net])]

    await asyncio.gather(*(agent.send(ContainerDestroy(machine_id=m, timeout_s=2)) for m in mids))
    for m in mids:
        await agent.wait(("container.destroyed",), m)
    after = [n.name for n in client.networks.list(names=[net])]
    client.close()

    assert {c.TYPE for c in created} == {"container.created"}
    assert (before, after) == ([net], [])
    assert [m for m in mids if _dockvm_containers(m)] == []


async def test_destroy_of_an_unknown_machine_still_answers(agent):
    mid = agent.machine_id()

    await agent.send(ContainerDestroy(machine_id=mid))
    destroyed = (await agent.wait(("container.destroyed",), mid))[0]

    assert destroyed.reason == "requested"


# ---- idempotency ------------------------------------------------------------------------------


async def test_duplicate_creates_even_concurrent_give_one_container(agent):
    mid = agent.machine_id()
    cmd = create_cmd(mid)

    await asyncio.gather(*(agent.send(cmd) for _ in range(5)))
    results = await agent.wait(RESULT_TYPES, mid, count=5)
    await agent.send(cmd)
    again = await agent.wait(RESULT_TYPES, mid, count=6)

    assert {r.TYPE for r in again} == {"container.created"}
    assert len({r.container_id for r in results + again}) == 1
    assert len(_dockvm_containers(mid)) == 1


# ---- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"image": "127.0.0.1:5001/dockvm/no-such-image:1"}, "image_not_found"),
        ({"cpus": 256}, "cpus_exhausted"),
        ({"memory": "1t"}, "memory_exhausted"),
        ({"memory": "4m"}, "memory_too_small"),
        ({"disk": "900t"}, "disk_exhausted"),
        ({"gateway": "10.231.2.1"}, "bad_gateway"),
        ({"ip": "10.231.1.1"}, "bad_ip"),
        ({"labels": {"dockvm.machine_id": "x"}}, "bad_labels"),
        # Same VLAN as the other machines, another pool: the VLAN's network does not fit.
        ({"ip": "10.231.7.9", "gateway": "10.231.7.1"}, "network_mismatch"),
        # A pool that overlaps the VLAN 3101 network cannot get a network of its own.
        ({"vlan_id": 3102}, "network_unavailable"),
    ],
)
async def test_bad_create_fails_clearly_and_leaves_nothing(agent, machine, overrides, reason):
    mid = agent.machine_id()

    result = await agent.create(mid, **overrides)
    client = _docker()
    networks = [n.name for n in client.networks.list() if n.name == f"{PREFIX}-vlan3102"]
    client.close()

    assert result.TYPE == "container.create_failed"
    assert result.reason.startswith(f"{reason}: ")
    assert result.retriable is False
    assert _dockvm_containers(mid) == []
    assert not (agent.state / "volumes" / f"{mid}.img").exists()
    assert [d for d in _loops_of(agent.state) if mid in d] == []
    assert networks == []


# ---- heartbeat, observe, prewarm -----------------------------------------------------------------


async def test_heartbeat_reports_capacity_allocation_and_images(agent, machine):
    beat = (await agent.wait(("host.heartbeat",), where=lambda b: b.machines >= 1))[-1]

    assert beat.host_id == agent.host_id and beat.dc == "dc1"
    assert beat.capacity.cpus >= 1 and beat.capacity.memory > 1 << 30
    assert beat.allocated.memory >= 256 << 20 and beat.allocated.disk >= 512 << 20
    assert IMAGE in beat.images
    assert beat.min_disk_bytes == 300 << 20  # the xfs driver's, for the gateway to check


@pytest.mark.parametrize(
    ("ref", "pulled", "error"),
    [(IMAGE, False, False), ("127.0.0.1:5001/dockvm/no-such-image:1", False, True)],
)
async def test_prewarm_skips_a_present_image_and_reports_a_missing_one(agent, ref, pulled, error):
    await agent.send(ImagePrewarm(ref=ref))
    result = (await agent.wait(("image.prewarmed",), where=lambda m: m.ref == ref))[0]

    assert result.pulled is pulled
    assert (result.error is not None) is error


@pytest.fixture
def registry_only_image() -> Iterator[str]:
    """A tag that exists in registry dc1 but not in the local engine."""
    ref = "127.0.0.1:5001/dockvm-tests/prewarm:1"
    client = _docker()
    client.api.tag(IMAGE, "127.0.0.1:5001/dockvm-tests/prewarm", "1")
    for line in client.api.push("127.0.0.1:5001/dockvm-tests/prewarm", tag="1", stream=True,
                                decode=True):  # fmt: skip
        assert "error" not in line, line
    client.api.remove_image(ref)
    yield ref
    client.api.remove_image(ref)
    client.close()


async def test_prewarm_pulls_from_the_registry(agent, registry_only_image):
    await agent.send(ImagePrewarm(ref=registry_only_image))
    result = (await agent.wait(("image.prewarmed",), where=lambda m: m.ref == registry_only_image))

    assert result[0].pulled is True and result[0].error is None
    assert _docker().images.get(registry_only_image).id == _docker().images.get(IMAGE).id


# ---- kill -9 in the middle of a create ---------------------------------------------------


@pytest.fixture
async def lone_agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """An agent of its own, for tests that kill or reconfigure it."""
    async for a in _agent(tmp_path, DOCKVM_RECONCILE_INTERVAL_S="0.5", DOCKVM_ORPHAN_GRACE_S="1"):
        yield a


async def test_kill9_during_create_then_restart_gives_exactly_one_container(lone_agent):
    agent = lone_agent
    mid = agent.machine_id()
    await agent.send(create_cmd(mid, vlan_id=3110, ip="10.231.10.5", gateway="10.231.10.1"))
    async with asyncio.timeout(30):
        # The moment the disk exists the create is under way: cut it there.
        while not (agent.state / "volumes" / f"{mid}.img").exists():
            await asyncio.sleep(0.005)
    agent.proc.kill()
    await agent.proc.proc.wait()

    await agent.start()
    created = await agent.wait(("container.created",), mid)
    observed = await agent.wait(("container.observed",), mid)

    assert len(_dockvm_containers(mid)) == 1
    assert _dockvm_containers(mid)[0].id == created[0].container_id
    assert observed[0].container_id == created[0].container_id
    assert await _sh(str(created[0].ip), "findmnt -n -o FSTYPE /data") == "xfs\n"


# ---- orphans (quarantine, purge, the cap, clusters: test_orphans.py) ---------------------


async def test_nothing_is_removed_before_the_control_plane_speaks(lone_agent):
    agent = lone_agent
    mid = agent.machine_id()
    assert (await agent.create(mid, vlan_id=3112, ip="10.231.12.5", gateway="10.231.12.1")).TYPE \
        == "container.created"  # fmt: skip

    observed = await agent.wait(("container.observed",), mid, count=4)

    assert not any(o.orphan for o in observed)
    assert len(_dockvm_containers(mid)) == 1


# ---- the ovs driver ------------------------------------------------------------------------------


@pytest.fixture
async def ovs_agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """An agent with the OVS network driver on a bridge of its own."""
    bridge = f"dvb{RUN}"
    try:
        async for a in _agent(tmp_path, DOCKVM_NETWORK_DRIVER="ovs", DOCKVM_OVS_BRIDGE=bridge):
            yield a
    finally:
        # The machines' veths went with their network namespaces; the bridge is left.
        subprocess.run(["ovs-vsctl", "--if-exists", "del-br", bridge], check=True)  # noqa: ASYNC221


async def _reaches(mid: str, ip: str) -> bool:
    """Whether machine ``mid`` can open a TCP connection to ``ip``:22."""
    proc = await asyncio.create_subprocess_exec(
        "docker", "exec", f"dockvm-{mid}", "timeout", "3", "bash", "-c",
        f"exec 3<>/dev/tcp/{ip}/22 && head -c 7 <&3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out == b"SSH-2.0"


async def test_ovs_same_vlan_reaches_other_vlan_does_not_even_after_restart(ovs_agent):
    agent = ovs_agent
    a, b, c = agent.machine_id(), agent.machine_id(), agent.machine_id()
    net = {"prefix_len": 24, "gateway": "10.231.20.1"}
    for mid, ip, vlan in ((a, "10.231.20.11", 201), (b, "10.231.20.12", 201),
                          (c, "10.231.20.13", 202)):  # fmt: skip
        created = await agent.create(mid, ip=ip, vlan_id=vlan, **net)
        assert created.TYPE == "container.created", created

    async with asyncio.timeout(30):
        while not await _reaches(a, "10.231.20.12"):
            await asyncio.sleep(0.3)
    same_vlan = await _reaches(a, "10.231.20.12")
    other_vlan = await _reaches(a, "10.231.20.13")
    # Docker gives b a new network namespace on start: the agent must plumb it again.
    await agent.send(ContainerStop(machine_id=b, timeout_s=2))
    await agent.wait(("container.action_done",), b)
    await agent.send(ContainerStart(machine_id=b))
    await agent.wait(("container.action_done",), b, count=2)
    async with asyncio.timeout(30):
        while not await _reaches(a, "10.231.20.12"):
            await asyncio.sleep(0.3)
    # A restart behind the agent's back (docker restart) is seen through the event stream.
    restart = await asyncio.create_subprocess_exec("docker", "restart", "-t", "1", f"dockvm-{b}")
    await restart.wait()
    async with asyncio.timeout(30):
        while not await _reaches(a, "10.231.20.12"):
            await asyncio.sleep(0.3)

    assert same_vlan is True
    assert other_vlan is False
    assert _inspect(b)["HostConfig"]["NetworkMode"] == "none"


# ---- the macvlan driver without its trunk: a missing network ---------------------------------


@pytest.fixture
async def macvlan_agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """An agent with the macvlan driver on a trunk interface this host does not have."""
    async for a in _agent(tmp_path, DOCKVM_NETWORK_DRIVER="macvlan",
                          DOCKVM_MACVLAN_TRUNK="dvnosuch0"):  # fmt: skip
        yield a


async def test_a_missing_network_fails_the_create_and_leaves_nothing(macvlan_agent):
    agent = macvlan_agent
    mid = agent.machine_id()

    result = await agent.create(mid, vlan_id=3120, ip="10.231.30.5", gateway="10.231.30.1")
    client = _docker()
    networks = client.networks.list(names=[f"{PREFIX}-vlan3120"])
    client.close()

    assert result.TYPE == "container.create_failed"
    assert result.reason.startswith("network_unavailable: ")
    assert "dvnosuch0" in result.reason
    assert _dockvm_containers(mid) == []
    assert not (agent.state / "volumes" / f"{mid}.img").exists()
    assert networks == []


# ---- deploys reach the agent's deployer --------------------------------------------------------


async def test_a_deploy_for_a_machine_not_on_this_host_fails_with_an_event(agent):
    mid = agent.machine_id()
    await agent.send(Deploy(
        release_id="r1", machine_id=mid,
        artifact=Artifact(group_id="com.example", artifact_id="demo", version="1.0.0"),
        health_check=HealthCheck(type="tcp", target="8080", timeout_s=2),
    ))  # fmt: skip

    failed = await agent.wait(("deploy.failed", "deploy.succeeded"), mid)

    assert failed[0].TYPE == "deploy.failed"
    assert (failed[0].host, failed[0].reason) == (agent.host_id, "not_found")
