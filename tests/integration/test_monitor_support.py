"""Shared fixtures of the monitor's integration tests (no tests here): a labelled sandbox.

Every container and network a test makes carries ``dockvm.montest=<uuid>`` and is removed in
the fixture's teardown, whatever the test did.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import docker
import pytest

IMAGE = "dockvm/base:bookworm"
TEST_LABEL = "dockvm.montest"


@dataclass
class Sandbox:
    """Containers on a bridge network of the test's own, all labelled with ``run``."""

    client: docker.DockerClient
    run: str
    network: str
    subnet_prefix: str
    created: list[str] = field(default_factory=list)
    _next_ip: int = 10

    @property
    def selector(self) -> str:
        """The label selector (``k=v``) a monitor uses to follow only this sandbox."""
        return f"{TEST_LABEL}={self.run}"

    def run_container(
        self, name: str, command: str | list[str], *, cpus: float | None = None,
        memory: str | None = None, lxcfs: bool = False, **kw: object,
    ) -> tuple[docker.models.containers.Container, str, str]:
        """Start a labelled container; return it with its machine id and IP."""
        ip = f"{self.subnet_prefix}.{self._next_ip}"
        self._next_ip += 1
        machine = f"m-{self.run[:8]}-{name}"
        labels = {
            TEST_LABEL: self.run,
            "dockvm.machine_id": machine,
            "dockvm.ip": ip,
            "dockvm.app": "montest",
        }
        volumes = (
            {"/var/lib/lxcfs/proc/meminfo": {"bind": "/proc/meminfo", "mode": "ro"}}
            if lxcfs else {}
        )
        container = self.client.containers.create(
            IMAGE, command, name=f"montest-{self.run[:8]}-{name}", labels=labels,
            nano_cpus=int(cpus * 1e9) if cpus else None, mem_limit=memory,
            memswap_limit=memory, volumes=volumes, network=self.network, **kw,
        )
        self.created.append(container.id)
        self.client.networks.get(self.network).disconnect(container)
        self.client.networks.get(self.network).connect(container, ipv4_address=ip)
        container.start()
        container.reload()
        return container, machine, ip

    def exec(self, container_id: str, cmd: list[str], detach: bool = False) -> str:
        """Run a command in a container; return its output (raise on a non-zero exit)."""
        c = self.client.containers.get(container_id)
        code, out = c.exec_run(cmd, detach=detach)
        if not detach and code != 0:
            raise RuntimeError(f"{cmd} exited {code}: {out!r}")
        return (out or b"").decode(errors="replace")


def _make_network(client: docker.DockerClient, run: str) -> tuple[str, str]:
    for _ in range(20):
        n = random.randint(1, 254)
        prefix = f"10.232.{n}"
        try:
            net = client.networks.create(
                f"montest-{run[:8]}",
                driver="bridge",
                ipam=docker.types.IPAMConfig(
                    pool_configs=[docker.types.IPAMPool(subnet=f"{prefix}.0/24")]
                ),
                labels={TEST_LABEL: run},
            )
            return net.name, prefix
        except docker.errors.APIError as err:
            if "overlap" not in str(err).lower():
                raise
    raise RuntimeError("no free 10.232.x.0/24 subnet")


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A fresh network and container list, removed after the test."""
    client = docker.from_env(timeout=120)
    run = uuid.uuid4().hex
    network, prefix = _make_network(client, run)
    box = Sandbox(client, run, network, prefix)
    try:
        yield box
    finally:
        for c in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}={run}"}):
            c.remove(force=True, v=True)
        for net in client.networks.list(filters={"label": f"{TEST_LABEL}={run}"}):
            net.remove()
        client.close()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = ""):
    """Poll ``predicate`` until it returns something truthy; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what or predicate}")
        time.sleep(interval)
