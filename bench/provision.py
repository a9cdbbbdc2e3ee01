"""Create-to-ready through the provisioner agent vs a bare ``docker run -d``.

Ready means the container runs and its sshd answers on port 22 with its banner. dockvm is timed
from the moment the ``container.create`` command is published on the bus (so the bus hop, the
XFS data disk, the VLAN network and the LXCFS binds are all included) to the banner; the peer is
timed from the start of ``docker run -d`` of the same image, on the same Docker network, with the
same limits, capabilities and authorized key, to the banner.

Each side runs N machines in sequence (interleaved, one dockvm then one bare) and N in parallel,
and prints p50/p95 and the dockvm/bare ratio. Everything made is removed at the end.

    .venv/bin/python bench/provision.py            # 20 + 20 per side
    .venv/bin/python bench/provision.py -n 5       # quicker
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libs.common.bus import AmqpPublisher, connect, host_key
from libs.common.contracts.provisioner import ContainerCreate, ContainerDestroy
from services.provisioner.domain import CAPABILITIES
from tests.support.probe import BusProbe
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dvbench{RUN}"
VLAN = 3999
SUBNET, GATEWAY = "10.231.250.0/24", "10.231.250.1"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIG0bW5n7bHZ0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0Z0 bench"
CPUS, MEMORY, DISK = 1, 256 << 20, 512 << 20


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

    async def ready(self, n: int, ip: str) -> float:
        """Create machine ``n`` with ``ip`` and return seconds to its sshd banner."""
        mid = f"{PREFIX}-{n}"
        self.made.append(mid)
        cmd = ContainerCreate(
            machine_id=mid, app="bench", image=IMAGE, cpus=CPUS, memory=MEMORY, disk=DISK,
            ip=ip, prefix_len=24, gateway=GATEWAY, vlan_id=VLAN, hostname=f"b{n}",
            ssh_authorized_keys=[KEY],
        )  # fmt: skip
        t0 = time.perf_counter()
        await self.publisher.publish(cmd, routing_key=host_key(self.host_id, cmd.TYPE))
        result = await self.probe.wait_for(
            "container.created", where=lambda m: m.machine_id == mid, timeout=120
        )
        await ssh_banner(str(result[0].ip))
        return time.perf_counter() - t0

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

    async def ready(self, n: int, ip: str) -> float:
        """Run container ``n`` with ``ip`` and return seconds to its sshd banner."""
        name = f"{PREFIX}-bare-{n}"
        self.made.append(name)
        caps = [a for c in CAPABILITIES for a in ("--cap-add", c)]
        t0 = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            "docker", "run", "-d", "--name", name, "--hostname", f"b{n}",
            "--network", self.network, "--ip", ip,
            "--cpus", str(CPUS), "--memory", str(MEMORY), "--memory-swap", str(MEMORY),
            "--pids-limit", "4096", "--restart", "unless-stopped", "--cap-drop", "ALL", *caps,
            "--label", f"dockvm.bench={RUN}", "-e", f"DOCKVM_AUTHORIZED_KEYS={KEY}", IMAGE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"docker run failed: {err.decode()}")
        await ssh_banner(ip)
        return time.perf_counter() - t0

    async def cleanup(self) -> None:
        """Remove every container made."""
        if self.made:
            proc = await asyncio.create_subprocess_exec(
                "docker", "rm", "-f", *self.made, stdout=asyncio.subprocess.DEVNULL
            )
            await proc.wait()
        self.made.clear()


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


async def main(n: int) -> None:
    """Run the benchmark with ``n`` machines per side and mode."""
    vhost = await create_vhost()
    conn = await connect(vhost.url, name="dockvm-bench")
    publisher = AmqpPublisher(conn, source="bench")
    probe = await BusProbe(conn, ["container.#"]).start()
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    network = f"{PREFIX}-vlan{VLAN}"
    pool = docker.types.IPAMPool(subnet=SUBNET, gateway=GATEWAY)
    ipam = docker.types.IPAMConfig(pool_configs=[pool])
    # Labelled as the agent labels its own, so both sides share one network.
    client.networks.create(network, driver="bridge", ipam=ipam, labels={"dockvm.network": "1"})
    host_id = f"bench-{RUN}"
    state = Path(tempfile.mkdtemp(prefix="dockvm-bench-"))
    agent = ServiceProcess(
        "provisioner",
        {
            "DOCKVM_AMQP_URL": vhost.url, "DOCKVM_MONGO_URL": MONGO_URL,
            "DOCKVM_MONGO_DB": f"bench_{RUN}", "DOCKVM_STATE_DIR": str(state),
            "DOCKVM_NETWORK_PREFIX": PREFIX, "DOCKVM_LOG_LEVEL": "warning",
        },
        free_port(), ["--host-id", host_id], log_path=state / "agent.log",
    )  # fmt: skip
    dockvm, bare = Dockvm(publisher, probe, host_id), Bare(network)
    try:
        await agent.start()
        # Warm both paths once (page cache of the image, the agent's first create).
        await dockvm.ready(900, "10.231.250.250")
        await bare.ready(901, "10.231.250.251")
        await dockvm.cleanup()
        await bare.cleanup()

        seq_d, seq_b = [], []
        for i in range(n):
            seq_d.append(await dockvm.ready(i, f"10.231.250.{10 + i}"))
            seq_b.append(await bare.ready(i, f"10.231.250.{130 + i}"))
        await dockvm.cleanup()
        await bare.cleanup()

        par_b = list(await asyncio.gather(
            *(bare.ready(100 + i, f"10.231.250.{130 + i}") for i in range(n))
        ))  # fmt: skip
        await bare.cleanup()
        par_d = list(await asyncio.gather(
            *(dockvm.ready(100 + i, f"10.231.250.{10 + i}") for i in range(n))
        ))  # fmt: skip
        await dockvm.cleanup()

        print(f"create-to-sshd-ready, {n} machines per mode, image {IMAGE}, "
              f"{CPUS} cpu / {MEMORY >> 20} MiB / disk {DISK >> 20} MiB (dockvm only)")  # fmt: skip
        report("sequential", seq_d, seq_b)
        report("parallel", par_d, par_b)
    finally:
        await bare.cleanup()
        try:
            await dockvm.cleanup()
        finally:
            await agent.stop()
            # The agent drops the VLAN network with its last machine; otherwise it is ours.
            with contextlib.suppress(docker.errors.NotFound):
                client.networks.get(network).remove()
            client.close()
            await probe.close()
            await publisher.close()
            await conn.close()
            await delete_vhost(vhost)
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="machines per side and mode (<= 100)")
    asyncio.run(main(min(parser.parse_args().n, 100)))
