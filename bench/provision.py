"""Create-to-ready through the provisioner agent vs a bare ``docker run -d``.

Ready means the container runs and its sshd answers on port 22 with its banner. dockvm is timed
from the moment the ``container.create`` command is published on the bus (so the bus hop, the
XFS data disk, the VLAN network and the LXCFS binds are all included) to the banner; the peer is
timed from the start of ``docker run -d`` of the same image, on the same Docker network, with the
same limits, capabilities and authorized key, to the banner.

Each side runs N machines in sequence (interleaved, one dockvm then one bare) and N in parallel,
and prints p50/p95 and the dockvm/bare ratio. ``--batch N`` instead publishes N creates at once
(as the gateway does for ``count: N``) with the small machines of issue 20 (0.05 CPU, 64 MiB,
512 MiB disk), and prints when the agent answered each (created) and when each sshd answered,
against N parallel ``docker run -d``. ``--profile FILE`` records the agent with
``py-spy record --idle --format raw`` during the batch. ``--systemd`` does the same with the
systemd flavour (``init: systemd``) against ``docker run -d`` of that image with what systemd
needs to boot unprivileged (the same tmpfs, cgroup namespace and name=systemd cgroup as the
agent gives), then times N reboots inside a machine (``systemctl reboot`` to the banner again)
against N ``docker restart`` of the bare one. Everything made is removed at the end.

    .venv/bin/python bench/provision.py            # 20 + 20 per side
    .venv/bin/python bench/provision.py -n 5       # quicker
    .venv/bin/python bench/provision.py --batch 50 --profile /tmp/agent.raw
    .venv/bin/python bench/provision.py --systemd -n 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libs.common.bus import AmqpPublisher, connect, host_key
from libs.common.contracts.provisioner import ContainerCreate, ContainerDestroy
from services.provisioner.domain import CAPABILITIES, SYSTEMD_CAPABILITIES, SYSTEMD_CGROUP
from tests.support.probe import BusProbe
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
SYSTEMD_IMAGE = os.environ.get("DOCKVM_SYSTEMD_IMAGE", "dockvm/base-systemd:bookworm")
INIT: str | None = None  # --systemd: "systemd" (and IMAGE is SYSTEMD_IMAGE)
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dvbench{RUN}"
VLAN = 3999
# The /24 of the run: the first of 10.231.250-254 no other network holds (a network whose
# endpoints dockerd failed to release cannot be removed, and would hold its pool until restart).
NET = "10.231.250"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0bW5n7bHZ0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0 bench"
CPUS, MEMORY, DISK = 1, 256 << 20, 512 << 20
# The machines of issue 20's batch: many small ones, so the engine, not the host, is the limit.
SMALL = (0.05, 64 << 20, 512 << 20)


async def ssh_banner(ip: str, deadline_s: float = 60.0) -> None:
    """Return once ``ip``:22 sends an SSH banner."""
    end = time.perf_counter() + deadline_s
    while True:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, 22), 1)
            try:
                line = await asyncio.wait_for(reader.readline(), 2)
            finally:
                writer.close()
            if line.startswith(b"SSH-"):
                return
        except (OSError, TimeoutError):
            pass
        if time.perf_counter() > end:
            raise TimeoutError(f"no sshd on {ip}")
        await asyncio.sleep(0.01)


class Dockvm:
    """Machines made through the agent on the bus."""

    def __init__(self, publisher: AmqpPublisher, probe: BusProbe, host_id: str) -> None:
        self.publisher, self.probe, self.host_id = publisher, probe, host_id
        self.made: list[str] = []

    async def _publish(self, n: int, ip: str, size: tuple[float, int, int]) -> str:
        mid = f"{PREFIX}-{n}"
        self.made.append(mid)
        cpus, memory, disk = size
        cmd = ContainerCreate(
            machine_id=mid, app="bench", image=IMAGE, cpus=cpus, memory=memory, disk=disk,
            ip=ip, prefix_len=24, gateway=f"{NET}.1", vlan_id=VLAN, hostname=f"b{n}",
            ssh_authorized_keys=[KEY], init=INIT,
        )  # fmt: skip
        await self.publisher.publish(cmd, routing_key=host_key(self.host_id, cmd.TYPE))
        return mid

    async def _answered(self, mid: str, t0: float) -> tuple[float, float]:
        """Seconds from ``t0`` to the machine's ``container.created`` and to its sshd banner."""
        result = await self.probe.wait_for(
            "container.created", where=lambda m: m.machine_id == mid, timeout=600
        )
        created = time.perf_counter() - t0
        await ssh_banner(str(result[0].ip), deadline_s=600)
        return created, time.perf_counter() - t0

    async def ready(self, n: int, ip: str) -> float:
        """Create machine ``n`` with ``ip`` and return seconds to its sshd banner."""
        t0 = time.perf_counter()
        mid = await self._publish(n, ip, (CPUS, MEMORY, DISK))
        return (await self._answered(mid, t0))[1]

    async def batch(self, ips: dict[int, str]) -> list[tuple[float, float]]:
        """Publish one small create per (n, ip) at once; (created, ready) seconds of each."""
        t0 = time.perf_counter()
        mids = [await self._publish(n, ip, SMALL) for n, ip in ips.items()]
        return list(await asyncio.gather(*(self._answered(mid, t0) for mid in mids)))

    async def cleanup(self) -> None:
        """Destroy every machine made, through the agent."""
        for mid in self.made:
            cmd = ContainerDestroy(machine_id=mid, timeout_s=1)
            await self.publisher.publish(cmd, routing_key=host_key(self.host_id, cmd.TYPE))
        for mid in self.made:
            await self.probe.wait_for(
                "container.destroyed", where=lambda m, mid=mid: m.machine_id == mid, timeout=120
            )
        self.made.clear()


class Bare:
    """The peer: ``docker run -d`` with the same image, network, limits and key."""

    def __init__(self, network: str) -> None:
        self.network = network
        self.made: list[str] = []
        self.returned: list[float] = []  # seconds until each `docker run -d` returned

    async def ready(self, n: int, ip: str, size: tuple[float, int, int] | None = None) -> float:
        """Run container ``n`` with ``ip`` and return seconds to its sshd banner."""
        name = f"{PREFIX}-bare-{n}"
        self.made.append(name)
        caps = [a for c in CAPABILITIES for a in ("--cap-add", c)]
        cpus, memory, _ = size or (CPUS, MEMORY, DISK)
        t0 = time.perf_counter()
        if INIT == "systemd":
            caps = [*_systemd_flags(name)]
            caps += [a for c in SYSTEMD_CAPABILITIES for a in ("--cap-add", c)]
        proc = await asyncio.create_subprocess_exec(
            "docker", "run", "-d", "--name", name, "--hostname", f"b{n}",
            "--network", self.network, "--ip", ip,
            "--cpus", str(cpus), "--memory", str(memory), "--memory-swap", str(memory),
            "--pids-limit", "4096", "--restart", "unless-stopped" if INIT is None else "on-failure",
            "--cap-drop", "ALL", *caps,
            "--label", f"dockvm.bench={RUN}", "-e", f"DOCKVM_AUTHORIZED_KEYS={KEY}", IMAGE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"docker run failed: {err.decode()}")
        self.returned.append(time.perf_counter() - t0)
        await ssh_banner(ip, deadline_s=600)
        return time.perf_counter() - t0

    async def cleanup(self) -> None:
        """Remove every container made (and the cgroups of systemd ones)."""
        if self.made:
            proc = await asyncio.create_subprocess_exec(
                "docker", "rm", "-f", *self.made, stdout=asyncio.subprocess.DEVNULL
            )
            await proc.wait()
        for name in self.made:
            _rmdir_tree(Path(f"{SYSTEMD_CGROUP}/dockvm/{name}"))
        self.made.clear()


def _systemd_flags(name: str) -> list[str]:
    """What ``docker run`` of the systemd image needs to boot unprivileged (as the agent's)."""
    cgroup = Path(f"{SYSTEMD_CGROUP}/dockvm/{name}")
    cgroup.mkdir(parents=True, exist_ok=True)
    return ["--tmpfs", "/run", "--tmpfs", "/run/lock", "--cgroupns", "private",
            "-v", f"{cgroup}:{SYSTEMD_CGROUP}"]  # fmt: skip


def _rmdir_tree(root: Path) -> None:
    if not root.is_dir():
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    root.rmdir()


async def _restarted(name: str, before: int) -> None:
    """Until the container ``name`` runs again after its ``before``-th restart."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        while True:
            c = client.api.inspect_container(name)
            if c["RestartCount"] > before and c["State"]["Running"]:
                return
            await asyncio.sleep(0.05)
    finally:
        client.close()


async def _ip_of(name: str) -> tuple[str, int]:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        c = client.api.inspect_container(name)
        nets = c["NetworkSettings"]["Networks"]
        return next(iter(nets.values()))["IPAddress"], int(c["RestartCount"])
    finally:
        client.close()


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    await proc.wait()


async def reboots(n: int, dockvm: Dockvm, bare: Bare) -> None:
    """``n`` reboots inside one systemd machine vs ``n`` ``docker restart`` of a bare one."""
    await dockvm.ready(300, f"{NET}.{10}")
    await bare.ready(300, f"{NET}.{130}")
    inside, restart = [], []
    for _ in range(n):
        name = f"dockvm-{dockvm.made[-1]}"
        ip, count = await _ip_of(name)
        t0 = time.perf_counter()
        await _run("docker", "exec", name, "systemctl", "reboot")
        await _restarted(name, count)
        await ssh_banner(ip, deadline_s=600)
        inside.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await _run("docker", "restart", "-t", "30", bare.made[-1])
        await ssh_banner(f"{NET}.130", deadline_s=600)
        restart.append(time.perf_counter() - t0)
    await dockvm.cleanup()
    await bare.cleanup()
    print(f"reboot-to-sshd, {n} times: dockvm `systemctl reboot` inside vs bare `docker restart`")
    report("reboot", inside, restart)


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def report(label: str, dockvm: list[float], bare: list[float]) -> None:
    """Print p50/p95 of both sides and the ratios."""
    d50, d95 = statistics.median(dockvm), pct(dockvm, 0.95)
    b50, b95 = statistics.median(bare), pct(bare, 0.95)
    print(f"{label:<11} dockvm p50 {d50 * 1000:7.0f} ms  p95 {d95 * 1000:7.0f} ms | "
          f"bare p50 {b50 * 1000:7.0f} ms  p95 {b95 * 1000:7.0f} ms | "
          f"ratio p50 {d50 / b50:4.2f}x  p95 {d95 / b95:4.2f}x")  # fmt: skip


async def compare(n: int, dockvm: Dockvm, bare: Bare) -> None:
    """``n`` machines per side one after another, then ``n`` in parallel."""
    seq_d, seq_b = [], []
    for i in range(n):
        seq_d.append(await dockvm.ready(i, f"{NET}.{10 + i}"))
        seq_b.append(await bare.ready(i, f"{NET}.{130 + i}"))
    await dockvm.cleanup()
    await bare.cleanup()

    par_b = list(await asyncio.gather(
        *(bare.ready(100 + i, f"{NET}.{130 + i}") for i in range(n))
    ))  # fmt: skip
    await bare.cleanup()
    par_d = list(await asyncio.gather(
        *(dockvm.ready(100 + i, f"{NET}.{10 + i}") for i in range(n))
    ))  # fmt: skip
    await dockvm.cleanup()

    print(f"create-to-sshd-ready, {n} machines per mode, image {IMAGE}, "
          f"{CPUS} cpu / {MEMORY >> 20} MiB / disk {DISK >> 20} MiB (dockvm only)")  # fmt: skip
    report("sequential", seq_d, seq_b)
    report("parallel", par_d, par_b)


@contextlib.asynccontextmanager
async def py_spy(pid: int, out: str | None) -> AsyncIterator[None]:
    """``py-spy record --idle --format raw`` on ``pid`` while the block runs (if ``out``)."""
    if out is None:
        yield
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    proc = await asyncio.create_subprocess_exec(
        spy, "record", "--idle", "--threads", "--format", "raw", "--rate", "50",
        "-p", str(pid), "-o", out, stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1.0)  # py-spy attaches before the batch starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        await proc.wait()


async def batch(n: int, dockvm: Dockvm, bare: Bare, pid: int, profile: str | None) -> None:
    """``n`` small creates published at once vs ``n`` parallel ``docker run -d``."""
    bare_t0 = time.perf_counter()
    bare.returned.clear()
    par_b = list(await asyncio.gather(
        *(bare.ready(200 + i, f"{NET}.{130 + i}", SMALL) for i in range(n))
    ))  # fmt: skip
    bare_all = time.perf_counter() - bare_t0
    await bare.cleanup()
    async with py_spy(pid, profile):
        results = await dockvm.batch({200 + i: f"{NET}.{10 + i}" for i in range(n)})
    created, ready = [c for c, _ in results], [r for _, r in results]
    t0 = time.perf_counter()
    await dockvm.cleanup()
    destroyed = time.perf_counter() - t0
    print(f"batch of {n} small machines ({SMALL[0]} cpu / {SMALL[1] >> 20} MiB / "
          f"disk {SMALL[2] >> 20} MiB), image {IMAGE}")  # fmt: skip
    print(f"dockvm created: first {min(created):6.1f} s  p50 {statistics.median(created):6.1f} s  "
          f"last {max(created):6.1f} s")  # fmt: skip
    print(f"dockvm ready:   first {min(ready):6.1f} s  p50 {statistics.median(ready):6.1f} s  "
          f"last {max(ready):6.1f} s")  # fmt: skip
    print(f"bare run -d returned: p50 {statistics.median(bare.returned):6.1f} s  "
          f"last {max(bare.returned):6.1f} s (the peer of dockvm created)")  # fmt: skip
    print(f"bare ready:     first {min(par_b):6.1f} s  p50 {statistics.median(par_b):6.1f} s  "
          f"last {bare_all:6.1f} s")  # fmt: skip
    print(f"ratio (last ready): {max(ready) / bare_all:4.2f}x   dockvm destroy of all: "
          f"{destroyed:5.1f} s")  # fmt: skip


def _network(client: docker.DockerClient, name: str) -> None:
    """Make the run's network on the first free /24 of 10.231.250-254 (sets ``NET``)."""
    global NET
    for third in range(250, 255):
        pool = docker.types.IPAMPool(subnet=f"10.231.{third}.0/24", gateway=f"10.231.{third}.1")
        ipam = docker.types.IPAMConfig(pool_configs=[pool])
        try:
            # Labelled as the agent labels its own, so both sides share one network.
            client.networks.create(name, driver="bridge", ipam=ipam, labels={"dockvm.network": "1"})
        except docker.errors.APIError as err:
            if "overlaps" not in str(err):
                raise
            continue
        NET = f"10.231.{third}"
        return
    raise RuntimeError("no free /24 in 10.231.250-254 for the benchmark's network")


async def main(n: int, batch_n: int | None, profile: str | None) -> None:
    """Run the benchmark: ``n`` machines per side and mode, or one batch of ``batch_n``."""
    vhost = await create_vhost()
    conn = await connect(vhost.url, name="dockvm-bench")
    publisher = AmqpPublisher(conn, source="bench")
    probe = await BusProbe(conn, ["container.#"]).start()
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    network = f"{PREFIX}-vlan{VLAN}"
    _network(client, network)
    host_id = f"bench-{RUN}"
    state = Path(tempfile.mkdtemp(prefix="dockvm-bench-"))
    agent = ServiceProcess(
        "provisioner",
        {
            "DOCKVM_AMQP_URL": vhost.url, "DOCKVM_MONGO_URL": MONGO_URL,
            "DOCKVM_MONGO_DB": f"bench_{RUN}", "DOCKVM_STATE_DIR": str(state),
            "DOCKVM_NETWORK_PREFIX": PREFIX,
            "DOCKVM_LOG_LEVEL": os.environ.get("DOCKVM_LOG_LEVEL", "warning"),
        },
        free_port(), ["--host-id", host_id], log_path=state / "agent.log",
    )  # fmt: skip
    dockvm, bare = Dockvm(publisher, probe, host_id), Bare(network)
    try:
        await agent.start()
        # Warm both paths once (page cache of the image, the agent's first create).
        await dockvm.ready(900, f"{NET}.250")
        await bare.ready(901, f"{NET}.251")
        await dockvm.cleanup()
        await bare.cleanup()
        if batch_n is None:
            await compare(n, dockvm, bare)
            if INIT == "systemd":
                await reboots(n, dockvm, bare)
        else:
            assert agent.proc is not None
            await batch(batch_n, dockvm, bare, agent.proc.pid, profile)
    finally:
        await bare.cleanup()
        try:
            await dockvm.cleanup()
        finally:
            await agent.stop()
            if os.environ.get("DOCKVM_BENCH_KEEP_LOG"):
                shutil.copy(state / "agent.log", os.environ["DOCKVM_BENCH_KEEP_LOG"])
            # The agent drops the VLAN network with its last machine; otherwise it is ours.
            try:
                client.networks.get(network).remove()
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as err:
                print(f"network {network} left behind: {err.explanation}", file=sys.stderr)
            client.close()
            await probe.close()
            await publisher.close()
            await conn.close()
            await delete_vhost(vhost)
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="machines per side and mode (<= 100)")
    parser.add_argument("--batch", type=int, help="one batch of this many small machines (<= 100)")
    parser.add_argument("--profile", help="py-spy raw output of the agent during the batch")
    parser.add_argument("--systemd", action="store_true", help="the systemd flavour, and reboots")
    args = parser.parse_args()
    if args.systemd:
        IMAGE, INIT = SYSTEMD_IMAGE, "systemd"
    batch_n = None if args.batch is None else min(args.batch, 100)
    asyncio.run(main(min(args.n, 100), batch_n, args.profile))
