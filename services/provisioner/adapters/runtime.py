"""The container runtime port and its Docker Engine adapter (the in-memory fake is in ``fakes``).

Every Docker SDK call runs in a bounded thread pool, never on the event loop (a ``lane`` is the
same client on a pool of its own, so one kind of work cannot hold the threads of another);
library errors leave this module as dockvm errors (``NotFoundError``, ``ConflictError``,
``DomainError``, ``TransientError``).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import os
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import structlog

from libs.common.errors import (
    DomainError,
    NotFoundError,
    TransientError,
    translate_errors,
)

from ..domain import (
    CPU_PERIOD,
    LABEL_IP,
    LABEL_MACHINE,
    SYSTEMD_CGROUP,
    ContainerSpec,
    container_name,
    cpus_from_quota,
    cpus_to_quota,
)

__all__ = [
    "RESYNC",
    "ContainerInfo",
    "ContainerRuntime",
    "DockerRuntime",
    "NetworkInfo",
]

log = structlog.get_logger("provisioner.runtime")
RESYNC = "*"  # not a machine_id: "events may have been missed, look at everything"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """What the agent needs to know of one labelled container."""

    id: str
    name: str
    machine_id: str
    labels: dict[str, str]
    state: str
    started_at: datetime | None
    pid: int
    cpus: float
    memory: int
    image: str
    network: str

    @property
    def ip(self) -> str | None:
        """The machine's IP, from its label."""
        return self.labels.get(LABEL_IP)

    @property
    def running(self) -> bool:
        """Whether the container runs now."""
        return self.state == "running"


@dataclass(frozen=True, slots=True)
class NetworkInfo:
    """A Docker network as the drivers see it."""

    name: str
    driver: str
    subnet: str | None
    gateway: str | None
    containers: int
    ours: bool = True  # made by a dockvm agent (labelled), so an agent may remove it


class ContainerRuntime(Protocol):
    """Port: the container engine of this host."""

    async def find(self, machine_id: str) -> ContainerInfo | None:
        """The container of ``machine_id``, or None."""
        ...

    async def list_managed(self) -> list[ContainerInfo]:
        """Every container labelled ``dockvm.machine_id``, running or not."""
        ...

    async def create(self, spec: ContainerSpec) -> ContainerInfo:
        """Create (not start) a container; ``ConflictError`` if the name is taken."""
        ...

    async def start(self, machine_id: str) -> ContainerInfo:
        """Start the container (no-op when running)."""
        ...

    async def stop(self, machine_id: str, timeout_s: int) -> ContainerInfo:
        """Stop gracefully: SIGTERM, then SIGKILL after ``timeout_s``."""
        ...

    async def restart(self, machine_id: str, timeout_s: int) -> ContainerInfo:
        """Restart the container."""
        ...

    async def remove(self, machine_id: str) -> bool:
        """Remove the container (forcefully); False if there was none."""
        ...

    async def update(self, machine_id: str, cpus: float | None, memory: int | None) -> None:
        """Change CPU and memory limits live (swap follows memory)."""
        ...

    async def memory_used(self, machine_id: str) -> int:
        """Memory the container uses now, without the page cache it could drop."""
        ...

    async def has_image(self, ref: str) -> bool:
        """Whether the engine holds ``ref``."""
        ...

    async def pull(self, ref: str) -> None:
        """Pull ``ref`` from its registry."""
        ...

    async def image_labels(self, ref: str) -> dict[str, str]:
        """The labels of the held image ``ref`` (``NotFoundError`` if not held)."""
        ...

    async def images(self) -> list[str]:
        """The tags of every image the engine holds."""
        ...

    async def host_resources(self) -> tuple[float, int]:
        """The host's CPUs and memory bytes."""
        ...

    async def network(self, name: str) -> NetworkInfo | None:
        """The named network, or None."""
        ...

    async def create_network(
        self, name: str, driver: str, subnet: str, gateway: str, options: dict[str, str]
    ) -> NetworkInfo:
        """Create a network with one IPv4 pool; ``ConflictError`` if it exists."""
        ...

    async def remove_network(self, name: str) -> bool:
        """Remove the network if no container uses it; True if removed."""
        ...


def _translated(fn: Callable[..., T]) -> Callable[..., T]:
    import requests

    inner = translate_errors(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return inner(*args, **kwargs)
        except requests.exceptions.RequestException as err:
            raise TransientError(f"docker engine unreachable: {err}") from err

    return wrapper


def _parse_time(value: str | None) -> datetime | None:
    if not value or value.startswith("0001-"):
        return None
    # Docker gives nanoseconds; Python keeps microseconds.
    head, _, frac = value.rstrip("Z").partition(".")
    frac = (frac + "000000")[:6]
    return datetime.fromisoformat(f"{head}.{frac}").replace(tzinfo=UTC)


def _make_cgroup_dirs(spec: ContainerSpec) -> None:
    """Make the host's cgroup directory a systemd machine's is bound to (Docker would make a
    plain directory, not a cgroup, if it were missing)."""
    for m in spec.mounts:
        if m.target == SYSTEMD_CGROUP:
            os.makedirs(m.source, exist_ok=True)


def _remove_cgroup_dirs(attrs: dict[str, Any]) -> None:
    """Remove the (now empty) cgroups a removed systemd machine made, deepest first."""
    for m in attrs.get("Mounts") or []:
        src = m.get("Source") or ""
        if m.get("Destination") != SYSTEMD_CGROUP or not src.startswith(SYSTEMD_CGROUP + "/"):
            continue
        for root, _dirs, _files in sorted(os.walk(src), key=lambda w: -w[0].count("/")):
            try:
                os.rmdir(root)
            except OSError as err:  # still has a process (a zombie's): the next sweep's
                log.warning("cgroup left behind", path=root, error=str(err))


def _info(attrs: dict[str, Any]) -> ContainerInfo:
    cfg = attrs.get("Config") or {}
    hc = attrs.get("HostConfig") or {}
    state = attrs.get("State") or {}
    labels = cfg.get("Labels") or {}
    return ContainerInfo(
        id=attrs["Id"],
        name=attrs.get("Name", "").lstrip("/"),
        machine_id=labels.get(LABEL_MACHINE, ""),
        labels=labels,
        state=state.get("Status", "unknown"),
        started_at=_parse_time(state.get("StartedAt")) if state.get("Running") else None,
        pid=int(state.get("Pid") or 0),
        cpus=cpus_from_quota(hc.get("CpuQuota"), hc.get("CpuPeriod")),
        memory=int(hc.get("Memory") or 0),
        image=cfg.get("Image", ""),
        network=hc.get("NetworkMode", ""),
    )


class DockerRuntime:
    """The Docker Engine through the docker SDK, off the event loop in a bounded pool."""

    def __init__(
        self, base_url: str, workers: int = 8, timeout_s: int = 120, *, connections: int = 0
    ) -> None:
        import docker

        # One pooled connection per thread of every lane that may call at once (``connections``);
        # with fewer, urllib3 opens and then discards a connection per call under load.
        self._client = docker.DockerClient(
            base_url=base_url, timeout=timeout_s, max_pool_size=max(connections, workers)
        )
        self._api = self._client.api
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="docker")
        self._lanes: list[DockerRuntime] = []

    def lane(self, workers: int, name: str) -> DockerRuntime:
        """The same engine client on a pool of its own ``workers`` threads."""
        lane = copy.copy(self)
        lane._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        lane._lanes = []
        self._lanes.append(lane)
        return lane

    async def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, functools.partial(_translated(fn), *args, **kwargs)
        )

    def _inspect(self, machine_id: str) -> ContainerInfo | None:
        import docker.errors

        try:
            attrs = self._api.inspect_container(container_name(machine_id))
        except docker.errors.NotFound:
            return None
        info = _info(attrs)
        # A container of that name made by someone else is not ours to drive.
        return info if info.machine_id == machine_id else None

    def _must(self, machine_id: str) -> ContainerInfo:
        info = self._inspect(machine_id)
        if info is None:
            raise NotFoundError(f"no container for machine {machine_id}")
        return info

    async def find(self, machine_id: str) -> ContainerInfo | None:
        """The container of ``machine_id``, or None."""
        return await self._call(self._inspect, machine_id)

    def _list(self) -> list[ContainerInfo]:
        import docker.errors

        out = []
        for c in self._api.containers(all=True, filters={"label": LABEL_MACHINE}):
            try:
                out.append(_info(self._api.inspect_container(c["Id"])))
            except docker.errors.NotFound:
                continue  # removed between the list and the inspect
        return out

    async def list_managed(self) -> list[ContainerInfo]:
        """Every container labelled ``dockvm.machine_id``, running or not."""
        return await self._call(self._list)

    def _create(self, spec: ContainerSpec) -> ContainerInfo:
        api = self._api
        _make_cgroup_dirs(spec)
        systemd: dict[str, Any] = {}
        if spec.tmpfs:
            systemd["tmpfs"] = dict.fromkeys(spec.tmpfs, "rw,nosuid,nodev,mode=755")
        if spec.cgroupns:
            systemd["cgroupns"] = spec.cgroupns
        host_config = api.create_host_config(
            binds=[f"{m.source}:{m.target}:{'ro' if m.read_only else 'rw'}" for m in spec.mounts],
            cap_drop=["ALL"],
            cap_add=list(spec.capabilities),
            privileged=False,
            mem_limit=spec.memory,
            memswap_limit=spec.memory,
            cpu_period=CPU_PERIOD,
            cpu_quota=cpus_to_quota(spec.cpus),
            pids_limit=spec.pids_limit,
            restart_policy={"Name": spec.restart_policy},
            network_mode=spec.network,
            **systemd,
        )
        networking = None
        if spec.ip is not None:
            networking = api.create_networking_config(
                {spec.network: api.create_endpoint_config(ipv4_address=spec.ip)}
            )
        created = api.create_container(
            spec.image,
            name=spec.name,
            hostname=spec.hostname,
            labels=spec.labels,
            environment=spec.env,
            host_config=host_config,
            networking_config=networking,
            stop_timeout=spec.stop_timeout_s,
            stop_signal=spec.stop_signal,
            detach=True,
        )
        return _info(api.inspect_container(created["Id"]))

    async def create(self, spec: ContainerSpec) -> ContainerInfo:
        """Create (not start) a container; ``ConflictError`` if the name is taken."""
        return await self._call(self._create, spec)

    def _start(self, machine_id: str) -> ContainerInfo:
        info = self._must(machine_id)
        if not info.running:
            self._api.start(info.id)
        return _info(self._api.inspect_container(info.id))

    async def start(self, machine_id: str) -> ContainerInfo:
        """Start the container (no-op when running)."""
        return await self._call(self._start, machine_id)

    def _stop(self, machine_id: str, timeout_s: int) -> ContainerInfo:
        info = self._must(machine_id)
        self._api.stop(info.id, timeout=timeout_s)
        return _info(self._api.inspect_container(info.id))

    async def stop(self, machine_id: str, timeout_s: int) -> ContainerInfo:
        """Stop gracefully: SIGTERM, then SIGKILL after ``timeout_s``."""
        return await self._call(self._stop, machine_id, timeout_s)

    def _restart(self, machine_id: str, timeout_s: int) -> ContainerInfo:
        info = self._must(machine_id)
        self._api.restart(info.id, timeout=timeout_s)
        return _info(self._api.inspect_container(info.id))

    async def restart(self, machine_id: str, timeout_s: int) -> ContainerInfo:
        """Restart the container."""
        return await self._call(self._restart, machine_id, timeout_s)

    def _remove(self, machine_id: str) -> bool:
        import docker.errors

        info = self._inspect(machine_id)
        if info is None:
            return False
        try:
            attrs = self._api.inspect_container(info.id)
            self._api.remove_container(info.id, force=True)
        except docker.errors.NotFound:
            return False
        _remove_cgroup_dirs(attrs)
        return True

    async def remove(self, machine_id: str) -> bool:
        """Remove the container (forcefully); False if there was none."""
        return await self._call(self._remove, machine_id)

    def _update(self, machine_id: str, cpus: float | None, memory: int | None) -> None:
        info = self._must(machine_id)
        kwargs: dict[str, Any] = {}
        if cpus is not None:
            kwargs.update(cpu_period=CPU_PERIOD, cpu_quota=cpus_to_quota(cpus))
        if memory is not None:
            kwargs.update(mem_limit=memory, memswap_limit=memory)
        if kwargs:
            self._api.update_container(info.id, **kwargs)

    async def update(self, machine_id: str, cpus: float | None, memory: int | None) -> None:
        """Change CPU and memory limits live (swap follows memory)."""
        await self._call(self._update, machine_id, cpus, memory)

    def _memory_used(self, machine_id: str) -> int:
        info = self._must(machine_id)
        if not info.running:
            return 0
        stats = self._api.stats(info.id, stream=False, one_shot=True)
        mem = stats.get("memory_stats") or {}
        detail = mem.get("stats") or {}
        # What `docker stats` shows: usage without the inactive page cache the kernel can drop.
        cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))
        return max(int(mem.get("usage", 0)) - int(cache), 0)

    async def memory_used(self, machine_id: str) -> int:
        """Memory the container uses now, without the page cache it could drop."""
        return await self._call(self._memory_used, machine_id)

    def _has_image(self, ref: str) -> bool:
        import docker.errors

        try:
            self._api.inspect_image(ref)
        except docker.errors.ImageNotFound:
            return False
        return True

    async def has_image(self, ref: str) -> bool:
        """Whether the engine holds ``ref``."""
        return await self._call(self._has_image, ref)

    def _image_labels(self, ref: str) -> dict[str, str]:
        import docker.errors

        try:
            attrs = self._api.inspect_image(ref)
        except docker.errors.ImageNotFound as err:
            raise NotFoundError(f"no image {ref}") from err
        return dict((attrs.get("Config") or {}).get("Labels") or {})

    async def image_labels(self, ref: str) -> dict[str, str]:
        """The labels of the held image ``ref`` (``NotFoundError`` if not held)."""
        return await self._call(self._image_labels, ref)

    def _pull(self, ref: str) -> None:
        from docker.utils import parse_repository_tag

        repo, tag = parse_repository_tag(ref)
        for line in self._api.pull(repo, tag=tag or "latest", stream=True, decode=True):
            if "error" in line:
                raise DomainError(f"pull of {ref} failed: {line['error']}", reason="pull_failed")

    async def pull(self, ref: str) -> None:
        """Pull ``ref`` from its registry."""
        await self._call(self._pull, ref)

    def _images(self) -> list[str]:
        tags: set[str] = set()
        for img in self._api.images():
            tags.update(t for t in img.get("RepoTags") or [] if t != "<none>:<none>")
        return sorted(tags)

    async def images(self) -> list[str]:
        """The tags of every image the engine holds."""
        return await self._call(self._images)

    def _host(self) -> tuple[float, int]:
        info = self._api.info()
        return float(info["NCPU"]), int(info["MemTotal"])

    async def host_resources(self) -> tuple[float, int]:
        """The host's CPUs and memory bytes."""
        return await self._call(self._host)

    def _network(self, name: str) -> NetworkInfo | None:
        import docker.errors

        try:
            attrs = self._api.inspect_network(name)
        except docker.errors.NotFound:
            return None
        # inspect matches id prefixes too: only an exact name is ours.
        if attrs.get("Name") != name:
            return None
        pools = (attrs.get("IPAM") or {}).get("Config") or [{}]
        return NetworkInfo(
            name=name,
            driver=attrs.get("Driver", ""),
            subnet=pools[0].get("Subnet"),
            gateway=pools[0].get("Gateway"),
            containers=len(attrs.get("Containers") or {}),
            ours=(attrs.get("Labels") or {}).get("dockvm.network") == "1",
        )

    async def network(self, name: str) -> NetworkInfo | None:
        """The named network, or None."""
        return await self._call(self._network, name)

    def _create_network(
        self, name: str, driver: str, subnet: str, gateway: str, options: dict[str, str]
    ) -> NetworkInfo:
        from docker.types import IPAMConfig, IPAMPool

        ipam = IPAMConfig(pool_configs=[IPAMPool(subnet=subnet, gateway=gateway)])
        self._api.create_network(
            name,
            driver=driver,
            options=options,
            ipam=ipam,
            check_duplicate=True,
            labels={"dockvm.network": "1"},
        )
        info = self._network(name)
        if info is None:  # removed between the create and the read: the retry makes it again
            raise TransientError(f"network {name} vanished right after it was created")
        return info

    async def create_network(
        self, name: str, driver: str, subnet: str, gateway: str, options: dict[str, str]
    ) -> NetworkInfo:
        """Create a network with one IPv4 pool; ``ConflictError`` if it exists."""
        return await self._call(self._create_network, name, driver, subnet, gateway, options)

    def _remove_network(self, name: str) -> bool:
        import docker.errors

        info = self._network(name)
        if info is None or info.containers or not info.ours:
            return False
        try:
            self._api.remove_network(name)
        except (docker.errors.NotFound, docker.errors.APIError):
            return False  # gone already, or a container joined meanwhile
        return True

    async def remove_network(self, name: str) -> bool:
        """Remove the network if no container uses it; True if removed."""
        return await self._call(self._remove_network, name)

    async def starts(self) -> AsyncIterator[str]:
        """Yield the machine_id of every labelled container start, as the engine reports it;
        after the stream was lost (e.g. a dockerd restart) yield ``RESYNC`` once, since starts
        may have been missed meanwhile."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str] = asyncio.Queue()
        stop = threading.Event()
        holder: dict[str, Any] = {}

        def pump() -> None:
            while not stop.is_set():
                try:
                    stream = self._api.events(
                        decode=True,
                        filters={"type": "container", "event": "start", "label": LABEL_MACHINE},
                    )
                    holder["stream"] = stream
                    for ev in stream:
                        mid = ((ev.get("Actor") or {}).get("Attributes") or {}).get(LABEL_MACHINE)
                        if mid:
                            loop.call_soon_threadsafe(queue.put_nowait, mid)
                except Exception as err:
                    if stop.is_set():
                        return
                    log.warning("docker events stream lost, reconnecting", error=repr(err))
                    stop.wait(1.0)
                    loop.call_soon_threadsafe(queue.put_nowait, RESYNC)

        # A dedicated thread: the stream blocks for the life of the agent.
        thread = threading.Thread(target=pump, name="docker-events", daemon=True)
        thread.start()
        try:
            while True:
                yield await queue.get()
        finally:
            stop.set()
            stream = holder.get("stream")
            if stream is not None:
                stream.close()

    def close(self) -> None:
        """Release the pools (this one's and its lanes') and the client."""
        for pool in [self._pool, *(lane._pool for lane in self._lanes)]:
            pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
