"""In-memory fakes of the provisioner's ports, for unit tests of the agent's logic.

They follow the real adapters' contract: tests/integration/test_provisioner_runtime.py runs the
same checks against :class:`MemoryRuntime` and the Docker Engine, and
tests/integration/test_provisioner_volumes.py against :class:`MemoryVolumes` and XFS on loop
devices. Each records what it was asked (``calls``, ``sizes``, ``host_calls``) and can be told to
fail (``fail_start``, ``fail_ensure``) so the undo paths can be exercised; ``MemoryRuntime`` can
hold every create at the door (``hold``) and counts how many were inside at once.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from libs.common.clock import utcnow
from libs.common.contracts.provisioner import XFS_MIN_DISK_BYTES
from libs.common.errors import (
    ConflictError,
    DomainError,
    NotFoundError,
    TransientError,
    ValidationFailed,
)

from .adapters.host import HostCommandFailed
from .adapters.runtime import ContainerInfo, NetworkInfo
from .domain import LABEL_MACHINE, ContainerSpec

__all__ = ["MemoryRuntime", "MemoryVolumes"]


@dataclass
class _FakeContainer:
    info: ContainerInfo
    spec: ContainerSpec
    memory_used: int = 32 << 20


@dataclass
class MemoryRuntime:
    """In-memory :class:`ContainerRuntime` for unit tests; the contract test keeps it honest."""

    cpus: float = 8.0
    memory: int = 16 << 30
    image_refs: set[str] = field(default_factory=lambda: {"dockvm/base:bookworm"})
    pullable: set[str] = field(default_factory=set)
    labels_of: dict[str, dict[str, str]] = field(default_factory=dict)
    containers: dict[str, _FakeContainer] = field(default_factory=dict)
    networks: dict[str, NetworkInfo] = field(default_factory=dict)
    fail_start: set[str] = field(default_factory=set)
    calls: list[str] = field(default_factory=list)
    # Creates wait for ``hold`` (when set) inside the runtime; ``inside`` counts them now,
    # ``most_inside`` at most. ``host_calls`` counts host_resources calls.
    hold: asyncio.Event | None = None
    inside: int = 0
    most_inside: int = 0
    host_calls: int = 0

    def _set(self, machine_id: str, **changes: Any) -> ContainerInfo:
        c = self.containers[machine_id]
        c.info = replace(c.info, **changes)
        return c.info

    def _must(self, machine_id: str) -> _FakeContainer:
        if machine_id not in self.containers:
            raise NotFoundError(f"no container for machine {machine_id}")
        return self.containers[machine_id]

    async def find(self, machine_id: str) -> ContainerInfo | None:
        """The container of ``machine_id``, or None."""
        c = self.containers.get(machine_id)
        return c.info if c else None

    async def list_managed(self) -> list[ContainerInfo]:
        """Every fake container."""
        return [c.info for c in self.containers.values()]

    async def create(self, spec: ContainerSpec) -> ContainerInfo:
        """Record a created container (after ``hold``, if set)."""
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            if self.hold is not None:
                await self.hold.wait()
            return self._create(spec)
        finally:
            self.inside -= 1

    def _create(self, spec: ContainerSpec) -> ContainerInfo:
        self.calls.append(f"create:{spec.labels[LABEL_MACHINE]}")
        machine_id = spec.labels[LABEL_MACHINE]
        if machine_id in self.containers:
            raise ConflictError(f"name {spec.name} is taken")
        if spec.image not in self.image_refs:
            raise NotFoundError(f"no such image: {spec.image}")
        if spec.network != "none" and spec.network not in self.networks:
            raise NotFoundError(f"network {spec.network} not found")
        info = ContainerInfo(
            id=uuid.uuid4().hex,
            name=spec.name,
            machine_id=machine_id,
            labels=dict(spec.labels),
            state="created",
            started_at=None,
            pid=0,
            cpus=spec.cpus,
            memory=spec.memory,
            image=spec.image,
            network=spec.network,
        )
        self.containers[machine_id] = _FakeContainer(info, spec)
        return info

    async def start(self, machine_id: str) -> ContainerInfo:
        """Mark running."""
        c = self._must(machine_id)
        if machine_id in self.fail_start:
            raise DomainError("container failed to start", reason="docker_rejected")
        if c.info.running:
            return c.info
        return self._set(machine_id, state="running", started_at=utcnow(), pid=4242)

    async def stop(self, machine_id: str, timeout_s: int) -> ContainerInfo:
        """Mark exited."""
        self._must(machine_id)
        return self._set(machine_id, state="exited", started_at=None, pid=0)

    async def restart(self, machine_id: str, timeout_s: int) -> ContainerInfo:
        """Mark running with a new start time."""
        self._must(machine_id)
        return self._set(machine_id, state="running", started_at=utcnow(), pid=4243)

    async def remove(self, machine_id: str) -> bool:
        """Forget the container."""
        return self.containers.pop(machine_id, None) is not None

    async def update(self, machine_id: str, cpus: float | None, memory: int | None) -> None:
        """Change the recorded limits."""
        c = self._must(machine_id)
        changes: dict[str, Any] = {}
        if cpus is not None:
            changes["cpus"] = cpus
        if memory is not None:
            if memory < c.memory_used:
                raise TransientError("the kernel could not reclaim enough memory")
            changes["memory"] = memory
        self._set(machine_id, **changes)

    async def memory_used(self, machine_id: str) -> int:
        """The recorded usage."""
        return self._must(machine_id).memory_used

    async def has_image(self, ref: str) -> bool:
        """Whether the ref is held."""
        return ref in self.image_refs

    async def image_labels(self, ref: str) -> dict[str, str]:
        """The labels given in ``labels_of`` (none by default) of a held ref."""
        if ref not in self.image_refs:
            raise NotFoundError(f"no image {ref}")
        return dict(self.labels_of.get(ref, {}))

    async def pull(self, ref: str) -> None:
        """Hold the ref if it is pullable."""
        if ref not in self.pullable:
            raise NotFoundError(f"manifest for {ref} not found")
        self.image_refs.add(ref)

    async def images(self) -> list[str]:
        """The held refs."""
        return sorted(self.image_refs)

    async def host_resources(self) -> tuple[float, int]:
        """The configured host size."""
        self.host_calls += 1
        return self.cpus, self.memory

    async def network(self, name: str) -> NetworkInfo | None:
        """The named network with its live container count."""
        n = self.networks.get(name)
        if n is None:
            return None
        used = sum(1 for c in self.containers.values() if c.spec.network == name)
        return replace(n, containers=used)

    async def create_network(
        self, name: str, driver: str, subnet: str, gateway: str, options: dict[str, str]
    ) -> NetworkInfo:
        """Record a network."""
        if name in self.networks:
            raise ConflictError(f"network {name} exists")
        if any(n.subnet == subnet for n in self.networks.values()):
            raise ValidationFailed(f"pool {subnet} overlaps", reason="docker_rejected")
        self.networks[name] = NetworkInfo(name, driver, subnet, gateway, 0)
        return self.networks[name]

    async def remove_network(self, name: str) -> bool:
        """Forget the network if unused."""
        n = await self.network(name)
        if n is None or n.containers:
            return False
        del self.networks[name]
        return True


@dataclass
class MemoryVolumes:
    """In-memory :class:`VolumeDriver` for unit tests."""

    root: Path = Path("/nonexistent/volumes")
    total: int = 100 << 30
    sizes: dict[str, int] = field(default_factory=dict)
    fail_ensure: bool = False
    min_size: int = XFS_MIN_DISK_BYTES

    def path(self, machine_id: str) -> Path:
        """A fake mountpoint."""
        return self.root / "mnt" / machine_id

    async def ensure(self, machine_id: str, size: int) -> Path:
        """Record a disk."""
        if self.fail_ensure:
            raise HostCommandFailed(("mkfs.xfs",), 1, "no space left")
        self.sizes.setdefault(machine_id, size)
        return self.path(machine_id)

    async def mount(self, machine_id: str) -> bool | None:
        """Nothing to mount."""
        return False if machine_id in self.sizes else None

    async def size(self, machine_id: str) -> int | None:
        """The recorded size."""
        return self.sizes.get(machine_id)

    async def grow(self, machine_id: str, size: int) -> None:
        """Record the new size."""
        self.sizes[machine_id] = size

    async def destroy(self, machine_id: str) -> bool:
        """Forget the disk."""
        return self.sizes.pop(machine_id, None) is not None

    async def list(self) -> list[str]:
        """Machines with a disk."""
        return sorted(self.sizes)

    async def capacity(self) -> tuple[int, int]:
        """Total and what is left after the recorded disks."""
        return self.total, self.total - sum(self.sizes.values())
