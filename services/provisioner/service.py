"""The provisioner's use-case layer: host commands become VM-like containers on this host.

Every machine command is idempotent by machine_id: Docker's container-name uniqueness
(``dockvm-<machine_id>``) makes a second container impossible, a repeated create adopts the
existing one, and each volume and network step reuses what an earlier attempt left. Within one
agent, commands for the same machine run one at a time (``lock``); creates of different machines
run in parallel, at most ``create_parallelism`` at once. Each returns its result event; a failed
create leaves nothing behind (no container, volume, loop device or VLAN network made for it, and
no disk reserved). A create asks nothing host-wide: the host's size and free disk come from
``capacity`` (cached, refreshed by the heartbeat; disk reserved per create in flight). The
periodic jobs (heartbeat, reconcile, re-plumbing) are in ``upkeep``.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import structlog

from libs.common.bus import Publisher
from libs.common.clock import utcnow
from libs.common.contracts.provisioner import (
    ContainerActionDone,
    ContainerActionFailed,
    ContainerCreate,
    ContainerCreated,
    ContainerCreateFailed,
    ContainerDestroy,
    ContainerDestroyed,
    ContainerResize,
    ContainerResized,
    ContainerResizeFailed,
    ContainerRestart,
    ContainerStart,
    ContainerStop,
    ImagePrewarm,
    ImagePrewarmed,
    MachinesKnown,
)
from libs.common.errors import DomainError, NotFoundError, TransientError, ValidationFailed

from .adapters.bastion import SshGuard, UserCaKey
from .adapters.network import NetworkDriver
from .adapters.runtime import ContainerInfo, ContainerRuntime
from .adapters.volumes import VolumeDriver
from .capacity import HostCapacity
from .domain import (
    LABEL_VLAN,
    LXCFS_FILES,
    SYSTEMD_CGROUP,
    build_spec,
    check_create,
    check_machine_id,
    machine_environment,
    machine_init,
    subnet_of,
    systemd_cgroup,
)
from .orphans import Orphans
from .resize import resize_machine

__all__ = ["AgentConfig", "ProvisionerService", "init_options"]


async def init_options(runtime: ContainerRuntime, cmd: ContainerCreate) -> dict[str, Any]:
    """``build_spec``'s init and systemd_cgroup for ``cmd``: its init, else its image's label."""
    init = machine_init(cmd.init, await runtime.image_labels(cmd.image))
    # A cgroup v2 host has no name=systemd hierarchy: the machine's own cgroup namespace is
    # all systemd gets there.
    cgroup = systemd_cgroup(cmd.machine_id) if Path(SYSTEMD_CGROUP).is_dir() else None
    return {"init": init, "systemd_cgroup": cgroup}

log = structlog.get_logger("provisioner")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The settings the agent's decisions depend on."""

    host_id: str
    dc: str
    version: str = "0"
    labels: tuple[tuple[str, str], ...] = ()
    lxcfs_path: Path | None = Path("/var/lib/lxcfs")
    pids_limit: int = 4096
    min_memory: int = 64 << 20
    memory_margin: int = 64 << 20
    stop_timeout_s: int = 30
    orphan_grace_s: float = 600.0
    # Orphans are quarantined, deleted only on a purge or after retention; a sweep with more
    # due than the cap (or the fraction of the host's machines) quarantines none.
    orphan_retention_s: float = 7 * 86400.0
    orphan_sweep_cap: int = 5
    orphan_sweep_fraction: float = 0.5
    # The cluster id and quarantine records (None: kept in memory only).
    orphans_dir: Path | None = None
    # Creates of different machines that run at once (the rest wait for a slot).
    create_parallelism: int = 16
    # Per-machine files bound into the container (/etc/environment); None: none are made.
    files_dir: Path | None = None


class _Stopwatch:
    """Seconds spent per named step, for a log line."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._at = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the time since the last lap under ``name``."""
        now = time.perf_counter()
        self.laps[name] = round(now - self._at, 3)
        self._at = now


def _reason(err: Exception) -> str:
    code = err.reason if isinstance(err, DomainError) else "transient"
    return f"{code}: {err}"


class ProvisionerService:
    """One Docker host's agent: turns host commands into VM-like containers."""

    def __init__(
        self,
        config: AgentConfig,
        runtime: ContainerRuntime,
        network: NetworkDriver,
        volumes: VolumeDriver,
        publisher: Publisher,
        clock: Callable[[], float] = time.monotonic,
        *,
        guard: SshGuard | None = None,
        user_ca: UserCaKey | None = None,
    ) -> None:
        self.config = config
        # The bastion's edge: the SSH source guard and the user CA machines trust (None: none).
        self.guard = guard
        self.user_ca = user_ca
        self.runtime = runtime
        self.network = network
        self.volumes = volumes
        self.publisher = publisher
        self.clock = clock
        self.orphans = Orphans(self, config.orphans_dir)
        self.capacity = HostCapacity(runtime, volumes, config.min_memory)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._create_slots = asyncio.Semaphore(config.create_parallelism)
        # Creates between preparing their VLAN's network and attaching a container to it: a
        # destroy must not drop that network under them (it has no endpoint yet).
        self._vlan_creates: Counter[int] = Counter()
        # Destroys in flight per VLAN: only the last one tries to drop the VLAN's network.
        self._vlan_destroys: Counter[int] = Counter()

    @property
    def host(self) -> str:
        """This host's id."""
        return self.config.host_id

    def lock(self, machine_id: str) -> asyncio.Lock:
        """The lock that makes one machine's commands and upkeep run one at a time."""
        return self._locks[machine_id]

    # ---- create -------------------------------------------------------------------------

    async def create(self, cmd: ContainerCreate) -> ContainerCreated | ContainerCreateFailed:
        """``container.create`` → ``container.created`` or ``container.create_failed``."""
        # The machine's lock first: a slot is never held by a create waiting for its machine.
        async with self.lock(cmd.machine_id), self._create_slots:
            return await self._create(cmd)

    async def _create(self, cmd: ContainerCreate) -> ContainerCreated | ContainerCreateFailed:
        """Make (or adopt) the machine's container, its disk reserved until it exists."""
        try:
            check_machine_id(cmd.machine_id)
        except DomainError as err:
            return self._create_failed(cmd, err)
        existing = await self.runtime.find(cmd.machine_id)
        if existing is not None:
            return await self._adopt(cmd.machine_id, existing)
        try:
            # No await between the check and the reservation: parallel creates see each other.
            check_create(cmd, await self.capacity.facts())
        except DomainError as err:
            return self._create_failed(cmd, err)
        disk = self.capacity.disk
        disk.reserve(cmd.machine_id, cmd.disk)
        made = False
        try:
            result = await self._make(cmd)
            made = isinstance(result, ContainerCreated)
        finally:
            # A failed create removed its disk; a made one holds its bytes until measured.
            if made:
                disk.finish(cmd.machine_id)
            else:
                disk.release(cmd.machine_id)
        return result

    async def _make(self, cmd: ContainerCreate) -> ContainerCreated | ContainerCreateFailed:
        """Take every step of a new machine; on failure undo every step taken."""
        log.info("creating machine", machine_id=cmd.machine_id, ip=str(cmd.ip))
        made_network = False
        self._vlan_creates[cmd.vlan_id] += 1
        try:
            await self._ensure_image(cmd.image)
            mode, made_network = await self.network.prepare(
                cmd.vlan_id, subnet_of(cmd.ip, cmd.prefix_len), cmd.gateway
            )
            data = await self.volumes.ensure(cmd.machine_id, cmd.disk)
            environment = self._write_environment(cmd.machine_id, cmd.cpus)
            user_ca = self._write_user_ca(cmd.machine_id, create=True)
            spec = build_spec(
                cmd,
                data_path=str(data),
                network=mode,
                static_ip=self.network.static_ip,
                lxcfs_root=self._lxcfs_root(),
                lxcfs_present=self._lxcfs_present(),
                environment_file=environment,
                pids_limit=self.config.pids_limit,
                stop_timeout_s=self.config.stop_timeout_s,
                user_ca_file=user_ca,
                host_id=self.host,
                cluster_id=self.orphans.cluster_id,
                **await init_options(self.runtime, cmd),
            )
            await self.runtime.create(spec)
            info = await self.runtime.start(cmd.machine_id)
            await self.network.plumb(info)
            await self.secure(info)
        except (DomainError, TransientError) as err:
            log.warning("create failed, undoing", machine_id=cmd.machine_id, error=str(err))
            # A VLAN network that existed before serves other machines: only ours goes.
            await self._undo(cmd.machine_id, cmd.vlan_id, drop_network=made_network)
            return self._create_failed(cmd, err)
        finally:
            self._vlan_creates[cmd.vlan_id] -= 1
        return self._created(info)

    async def _adopt(
        self, machine_id: str, info: ContainerInfo
    ) -> ContainerCreated | ContainerCreateFailed:
        """A repeated create: make sure the existing container runs, and report it."""
        try:
            if not info.running:
                await self.volumes.mount(machine_id)
                info = await self.runtime.start(machine_id)
            await self.network.plumb(info)
            await self.secure(info)
        except (DomainError, TransientError) as err:
            return ContainerCreateFailed(
                machine_id=machine_id,
                host=self.host,
                reason=_reason(err),
                retriable=True,
            )
        log.info("create repeated, existing container kept", machine_id=machine_id)
        return self._created(info)

    def _created(self, info: ContainerInfo) -> ContainerCreated:
        return ContainerCreated(
            machine_id=info.machine_id,
            container_id=info.id,
            host=self.host,
            ip=IPv4Address(info.ip or "0.0.0.0"),
            started_at=info.started_at or utcnow(),
        )

    def _create_failed(self, cmd: ContainerCreate, err: Exception) -> ContainerCreateFailed:
        return ContainerCreateFailed(
            machine_id=cmd.machine_id,
            host=self.host,
            reason=_reason(err),
            retriable=isinstance(err, TransientError),
        )

    async def _ensure_image(self, ref: str) -> None:
        if await self.runtime.has_image(ref):
            return
        try:
            await self.runtime.pull(ref)
        except TransientError as err:
            raise TransientError(f"image {ref} is not here and its registry failed: {err}") from err
        except DomainError as err:
            raise ValidationFailed(
                f"image {ref} is not on this host nor in its registry: {err}",
                reason="image_not_found",
            ) from err

    async def _undo(self, machine_id: str, vlan_id: int, *, drop_network: bool) -> None:
        """Remove whatever a failed create made; each step is tried even if one fails."""
        steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("container", lambda: self.runtime.remove(machine_id)),
            ("volume", lambda: self.volumes.destroy(machine_id)),
            ("files", lambda: self._remove_files(machine_id)),
            # Decided when the step runs: another create may have come to the VLAN meanwhile.
            ("network", lambda: self._release_network(machine_id, vlan_id, drop_network, 1)),
        ]
        for what, step in steps:
            try:
                await step()
            except Exception as err:
                log.error("cleanup step failed", machine_id=machine_id, step=what, error=str(err))

    async def _release_network(
        self, machine_id: str, vlan_id: int, drop_network: bool, own_creates: int
    ) -> None:
        """Release the machine's port; drop the VLAN's network only if no other create is
        about to attach to it (``own_creates``: whether the caller is such a create). The
        check and the driver's lock are taken with no await between them, and a later create's
        ``prepare`` queues behind that lock, finding the network gone and making it anew."""
        drop = drop_network and self._vlan_creates[vlan_id] <= own_creates
        await self.network.release(machine_id, vlan_id, drop_network=drop)

    def _write_environment(self, machine_id: str, cpus: float) -> str | None:
        """Write the machine's /etc/environment in place (a bind mount follows the inode)."""
        if self.config.files_dir is None:
            return None
        path = self.config.files_dir / machine_id / "environment"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            f.write(machine_environment(cpus))
        return str(path)

    def _write_user_ca(self, machine_id: str, *, create: bool = False) -> str | None:
        """Write the machine's copy of the bastion's user CA key in place, if it changed
        (``create``: also when the machine has none yet); "" while there is no key."""
        if self.config.files_dir is None:
            return None
        path = self.config.files_dir / machine_id / "user_ca.pub"
        if not create and not path.exists():
            return None  # a machine made before the bastion: nothing is bound to update
        key = self.user_ca.current() if self.user_ca is not None else ""
        if not path.exists() or path.read_text() != key:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(key)
        return str(path)

    async def secure(self, info: ContainerInfo) -> None:
        """The bastion's hold on a running machine: its CA copy is current, its SSH port
        answers only the bastion (after every start, and at every reconcile)."""
        if not info.running:
            return
        self._write_user_ca(info.machine_id)
        if self.guard is not None:
            await self.guard.apply(info)

    async def _remove_files(self, machine_id: str) -> None:
        if self.config.files_dir is None:
            return
        folder = self.config.files_dir / machine_id
        for child in folder.glob("*"):
            child.unlink()
        if folder.exists():
            folder.rmdir()

    def _lxcfs_root(self) -> str | None:
        root = self.config.lxcfs_path
        if root is None or not (root / "proc" / "meminfo").exists():
            log.warning("LXCFS is absent: machines will see the host's /proc", path=str(root))
            return None
        return str(root)

    def _lxcfs_present(self) -> list[str]:
        root = self.config.lxcfs_path
        return [rel for rel in LXCFS_FILES if root is not None and (root / rel).exists()]

    # ---- start / stop / restart / destroy ------------------------------------------------

    async def act(
        self, cmd: ContainerStart | ContainerStop | ContainerRestart
    ) -> ContainerActionDone | ContainerActionFailed:
        """Start, stop or restart → ``container.action_done`` or ``container.action_failed``."""
        action = cmd.TYPE.split(".", 1)[1]
        async with self.lock(cmd.machine_id):
            try:
                check_machine_id(cmd.machine_id)
                if isinstance(cmd, ContainerStop):
                    info = await self.runtime.stop(cmd.machine_id, cmd.timeout_s)
                else:
                    if await self.runtime.find(cmd.machine_id) is None:
                        raise NotFoundError(f"no container for machine {cmd.machine_id}")
                    # After a host reboot the disk must be back before the machine starts.
                    await self.volumes.mount(cmd.machine_id)
                    if isinstance(cmd, ContainerRestart):
                        info = await self.runtime.restart(cmd.machine_id, cmd.timeout_s)
                    else:
                        info = await self.runtime.start(cmd.machine_id)
                    await self.network.plumb(info)
                    await self.secure(info)
            except (DomainError, TransientError) as err:
                return self._action_failed(cmd.machine_id, action, err)
        return ContainerActionDone(
            machine_id=cmd.machine_id, host=self.host, action=action, state=info.state
        )

    async def destroy(self, cmd: ContainerDestroy) -> ContainerDestroyed | ContainerActionFailed:
        """Destroy → ``container.destroyed`` (also when it was gone already)."""
        async with self.lock(cmd.machine_id):
            try:
                check_machine_id(cmd.machine_id)
                await self.remove_machine(cmd.machine_id, cmd.timeout_s)
            except (DomainError, TransientError) as err:
                return self._action_failed(cmd.machine_id, "destroy", err)
        return ContainerDestroyed(machine_id=cmd.machine_id, host=self.host)

    def _action_failed(
        self, machine_id: str, action: str, err: DomainError | TransientError
    ) -> ContainerActionFailed:
        return ContainerActionFailed(
            machine_id=machine_id,
            host=self.host,
            action=action,
            reason=_reason(err),
            retriable=isinstance(err, TransientError),
        )

    async def remove_machine(self, machine_id: str, timeout_s: int) -> None:
        """Stop gracefully (``timeout_s`` > 0; else a forced removal kills it at once), remove
        the container, its disk and its network port."""
        took = _Stopwatch()
        info = await self.runtime.find(machine_id)
        took.lap("find")
        vlan: int | None = None
        if info is not None:
            vlan = int(info.labels[LABEL_VLAN]) if LABEL_VLAN in info.labels else None
        if vlan is not None:
            self._vlan_destroys[vlan] += 1
        try:
            if info is not None:
                if info.running and timeout_s > 0:
                    await self.runtime.stop(machine_id, timeout_s)
                    took.lap("stop")
                await self.runtime.remove(machine_id)
                took.lap("remove")
            if await self.volumes.destroy(machine_id):
                self.capacity.disk_freed()
            took.lap("volume")
            await self._remove_files(machine_id)
            if self.guard is not None:
                self.guard.forget(machine_id)
        finally:
            if vlan is not None:
                self._vlan_destroys[vlan] -= 1
        if vlan is not None and self._vlan_destroys[vlan] == 0:
            # Only the last destroy of the VLAN in flight tries to drop its network: the try is
            # an engine call under the VLAN's lock, and one per destroy queued a batch's
            # destroys one behind another (bench/api.py).
            await self._release_network(machine_id, vlan, True, 0)
            took.lap("network")
        self.orphans.forget(machine_id)
        # Where a destroy's time goes, per step (bench/api.py reads it back).
        log.info("machine destroyed", machine_id=machine_id, seconds=took.laps)

    # ---- resize -------------------------------------------------------------------------

    async def resize(self, cmd: ContainerResize) -> ContainerResized | ContainerResizeFailed:
        """Live resize → ``container.resized`` or ``container.resize_failed``."""
        async with self.lock(cmd.machine_id):
            return await resize_machine(self, cmd)

    # ---- images and the control plane's list --------------------------------------------

    async def prewarm(self, cmd: ImagePrewarm) -> ImagePrewarmed:
        """Pull an image ahead of the first create → ``image.prewarmed``."""
        try:
            if await self.runtime.has_image(cmd.ref):
                result = ImagePrewarmed(host=self.host, ref=cmd.ref, pulled=False)
            else:
                await self.runtime.pull(cmd.ref)
                result = ImagePrewarmed(host=self.host, ref=cmd.ref, pulled=True)
        except (DomainError, TransientError) as err:
            result = ImagePrewarmed(host=self.host, ref=cmd.ref, pulled=False, error=_reason(err))
        return result

    async def record_known(self, cmd: MachinesKnown) -> None:
        """Record the control plane's list of this host's machines (for orphan quarantine)."""
        await self.orphans.record_known(cmd)
