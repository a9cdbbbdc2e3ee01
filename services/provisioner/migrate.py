"""Cold migration on one agent: export a machine (the source), import one (the target), and end
an export (``moved``: remove what is left here; ``back``: start the machine here again).

Export stops the machine, unmounts its disk and detaches the loop device (the volume file is
then still and whole), reads its identity (:mod:`.adapters.transfer`) and offers both for one
import on the agent's HTTP port. Import is a create whose disk is copied from that offer, not
made, and whose container gets the identity before its first start; like a create it either
answers ``machine.imported`` or leaves nothing behind (no container, volume file, loop device,
files or port) and answers ``machine.import_failed``.

Only the ``xfs`` volume driver can export (its disk is a file); ``lvm`` is refused
(``migrate_unsupported``). Every command is idempotent by machine_id and runs under the
machine's lock: a repeated export answers again, a repeated import adopts what the first made,
a repeated end finds nothing left to do. The parts of a create this reuses are the agent's own.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from libs.common.clock import utcnow
from libs.common.contracts.provisioner import (
    ContainerCreate,
    MachineExport,
    MachineExported,
    MachineExportEnd,
    MachineExportEnded,
    MachineExportFailed,
    MachineImport,
    MachineImported,
    MachineImportFailed,
)
from libs.common.errors import DomainError, NotFoundError, TransientError, ValidationFailed

from .adapters.transfer import ExportOffer, Exports, IdentityStore, fetch_disk, fetch_identity
from .adapters.volumes import XfsLoopVolumes
from .domain import LABEL_VLAN, build_spec, check_create, check_machine_id, subnet_of
from .service import ProvisionerService, init_options

__all__ = ["Migrations"]

log = structlog.get_logger("provisioner.migrate")
# How long an export waits for the kernel to let go of a disk it unmounted.
RELEASE_TIMEOUT_S = 30.0


def _reason(err: Exception) -> str:
    code = err.reason if isinstance(err, DomainError) else "transient"
    return f"{code}: {err}"


class Migrations:
    """Exports and imports of machines on this agent's host."""

    def __init__(
        self,
        agent: ProvisionerService,
        identity: IdentityStore,
        session: aiohttp.ClientSession,
        url: str,
        exports: Exports | None = None,
    ) -> None:
        self.agent = agent
        self.identity = identity
        self.session = session
        # Where other agents reach this one's offers (its HTTP port).
        self.url = url.rstrip("/")
        self.exports = exports or Exports()

    def _volumes(self) -> XfsLoopVolumes:
        volumes = self.agent.volumes
        if not isinstance(volumes, XfsLoopVolumes):
            raise ValidationFailed(
                "only the xfs volume driver can migrate a machine (its disk is a file)",
                reason="migrate_unsupported",
            )
        return volumes

    # ---- the source ---------------------------------------------------------------------

    async def export(self, cmd: MachineExport) -> MachineExported | MachineExportFailed:
        """Stop the machine and offer its disk and identity → ``machine.exported``."""
        agent, mid = self.agent, cmd.machine_id
        async with agent.lock(mid):
            was_running = False
            try:
                check_machine_id(mid)
                volumes = self._volumes()
                info = await agent.runtime.find(mid)
                if info is None:
                    raise NotFoundError(f"no container for machine {mid}")
                earlier = self.exports.get(mid)
                was_running = info.running or (earlier is not None and earlier.was_running)
                if info.running:
                    await agent.runtime.stop(mid, cmd.timeout_s)
                if LABEL_VLAN in info.labels:
                    # Its port goes with it (the target makes its own; a switch back re-plumbs).
                    vlan = int(info.labels[LABEL_VLAN])
                    await agent.network.release(mid, vlan, drop_network=False)
                identity = await self.identity.read(mid)
                await self._detach(volumes, mid)
                disk = volumes.image(mid)
                self.exports.offer(ExportOffer(mid, cmd.token, disk, identity, was_running))
            except (DomainError, TransientError) as err:
                log.warning("export failed, machine kept here", machine_id=mid, error=str(err))
                try:
                    await self._resume(mid, was_running)
                except (DomainError, TransientError) as again:
                    log.error("machine not resumed", machine_id=mid, error=str(again))
                return MachineExportFailed(
                    machine_id=mid,
                    host=agent.host,
                    reason=_reason(err),
                    retriable=isinstance(err, TransientError),
                )
        log.info("machine exported", machine_id=mid, disk=disk.stat().st_size)
        return MachineExported(
            machine_id=mid,
            host=agent.host,
            url=f"{self.url}/exports/{mid}",
            disk=disk.stat().st_size,
            was_running=was_running,
        )

    async def _detach(self, volumes: XfsLoopVolumes, machine_id: str) -> None:
        """Unmount the disk and detach its loop device: the file is then still and complete."""
        mnt = volumes.path(machine_id)
        if _mounted(mnt):
            await volumes.host.run("umount", str(mnt))
        img = volumes.image(machine_id)
        if not img.exists():
            raise NotFoundError(f"machine {machine_id} has no disk file")
        out = await volumes.host.run("losetup", "-n", "-O", "NAME", "-j", str(img))
        for dev in out.split():
            await volumes.host.run("losetup", "-d", dev)
        await self._released(volumes, img)

    async def _released(self, volumes: XfsLoopVolumes, img: Path) -> None:
        """Wait until no loop device holds ``img``: only then is its filesystem shut down (its
        log written, its data on the file). An unmount returns while another mount namespace
        still holds a copy of the mount (one a container start cloned a moment before); the
        kernel detaches the device (autoclear) when that copy goes."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        while (await volumes.host.run("losetup", "-n", "-O", "NAME", "-j", str(img))).strip():
            if loop.time() > start + RELEASE_TIMEOUT_S:
                raise TransientError(
                    f"{img.name} is still held by the kernel {RELEASE_TIMEOUT_S:g} s after "
                    "its unmount; not exported"
                )
            await asyncio.sleep(0.1)
        if loop.time() - start > 0.05:
            log.info("disk released late after its unmount", file=img.name,
                     waited_s=round(loop.time() - start, 2))  # fmt: skip

    async def _resume(self, machine_id: str, start: bool) -> str:
        """The machine's disk back in place and (``start``) the machine running; its state."""
        agent = self.agent
        await agent.volumes.mount(machine_id)
        info = await agent.runtime.find(machine_id)
        if info is None:
            raise NotFoundError(f"no container for machine {machine_id}")
        if start and not info.running:
            info = await agent.runtime.start(machine_id)
        await agent.network.plumb(info)
        await agent.secure(info)
        return info.state

    async def end(self, cmd: MachineExportEnd) -> MachineExportEnded:
        """``moved``: remove the machine here; ``back``: start it here again."""
        agent, mid = self.agent, cmd.machine_id
        state = ""
        async with agent.lock(mid):
            try:
                check_machine_id(mid)
                if cmd.outcome == "moved":
                    # The container first: its port went at the export, and releasing it by
                    # name now could take the target's (hosts that share one kernel, here).
                    await agent.runtime.remove(mid)
                    await agent.remove_machine(mid, cmd.timeout_s)
                    state = "removed"
                else:
                    state = await self._resume(mid, cmd.start)
                self.exports.withdraw(mid)
            except (DomainError, TransientError) as err:
                log.error("export end failed", machine_id=mid, outcome=cmd.outcome, error=str(err))
                return MachineExportEnded(
                    machine_id=mid, host=agent.host, outcome=cmd.outcome, ok=False,
                    reason=_reason(err),
                )  # fmt: skip
        log.info("export ended", machine_id=mid, outcome=cmd.outcome, state=state)
        return MachineExportEnded(machine_id=mid, host=agent.host, outcome=cmd.outcome, state=state)

    # ---- the target ---------------------------------------------------------------------

    async def import_(self, cmd: MachineImport) -> MachineImported | MachineImportFailed:
        """Make the machine from another host's offer → ``machine.imported``."""
        agent, mid = self.agent, cmd.machine_id
        async with agent.lock(mid):
            try:
                check_machine_id(mid)
                self._volumes()
                existing = await agent.runtime.find(mid)
                if existing is not None:
                    return await self._adopt(cmd)
                if cmd.deadline is not None and utcnow() > _aware(cmd.deadline):
                    raise ValidationFailed("the import came after its deadline", reason="late")
                check_create(cmd, await agent.capacity.facts())
            except (DomainError, TransientError) as err:
                return self._import_failed(cmd, err)
            disk = agent.capacity.disk
            disk.reserve(mid, cmd.disk)
            made = False
            try:
                result = await self._make(cmd)
                made = isinstance(result, MachineImported)
            finally:
                if made:
                    disk.finish(mid)
                else:
                    disk.release(mid)
            return result

    async def _adopt(self, cmd: MachineImport) -> MachineImported | MachineImportFailed:
        """A repeated import: what the first made stays; started if it should run."""
        try:
            state = await self._resume(cmd.machine_id, cmd.start)
            info = await self.agent.runtime.find(cmd.machine_id)
        except (DomainError, TransientError) as err:
            return self._import_failed(cmd, err, retriable=True)
        return MachineImported(
            machine_id=cmd.machine_id, host=self.agent.host,
            container_id=info.id if info else "", state=state,
        )  # fmt: skip

    async def _make(self, cmd: MachineImport) -> MachineImported | MachineImportFailed:
        """A create whose disk and identity come from the offer; undone whole on failure."""
        agent, mid = self.agent, cmd.machine_id
        log.info("importing machine", machine_id=mid, source=cmd.source_url)
        made_network = False
        try:
            await agent._ensure_image(cmd.image)
            mode, made_network = await agent.network.prepare(
                cmd.vlan_id, subnet_of(cmd.ip, cmd.prefix_len), cmd.gateway
            )
            copied = await self._copy_disk(cmd)
            data = await agent.volumes.ensure(mid, cmd.disk)
            create = ContainerCreate.model_validate(_create_fields(cmd))
            # The same init as at its create: a systemd machine's image says so by its label.
            spec = build_spec(create, **self._spec_args(mid, cmd.cpus, str(data), mode),
                              **await init_options(agent.runtime, create))  # fmt: skip
            info = await agent.runtime.create(spec)
            await self.identity.write(mid, await fetch_identity(self.session, cmd.source_url,
                                                                cmd.token))  # fmt: skip
            if cmd.start:
                info = await agent.runtime.start(mid)
                await agent.network.plumb(info)
                await agent.secure(info)
        except (DomainError, TransientError) as err:
            log.warning("import failed, undoing", machine_id=mid, error=str(err))
            await agent._undo(mid, cmd.vlan_id, drop_network=made_network)
            return self._import_failed(cmd, err)
        log.info("machine imported", machine_id=mid, bytes=copied, state=info.state)
        return MachineImported(
            machine_id=mid, host=agent.host, container_id=info.id, state=info.state,
            bytes_copied=copied,
        )  # fmt: skip

    async def _copy_disk(self, cmd: MachineImport) -> int:
        """The offered disk into this host's volume file (via a temporary name, so a copy cut
        short is never taken for a disk); the data bytes copied."""
        volumes = self._volumes()
        img = volumes.image(cmd.machine_id)
        volumes.root.mkdir(parents=True, exist_ok=True)
        tmp: Path = img.with_suffix(".tmp")
        size, copied = await fetch_disk(self.session, cmd.source_url, cmd.token, tmp)
        if size != cmd.disk:
            tmp.unlink(missing_ok=True)
            raise ValidationFailed(
                f"the offered disk has {size} bytes, the machine {cmd.disk}", reason="disk_size"
            )
        tmp.rename(img)
        return copied

    def _spec_args(self, machine_id: str, cpus: float, data: str, mode: str) -> dict[str, Any]:
        """What ``build_spec`` needs besides the command, as a create gives it."""
        agent = self.agent
        return {
            "data_path": data,
            "network": mode,
            "static_ip": agent.network.static_ip,
            "lxcfs_root": agent._lxcfs_root(),
            "lxcfs_present": agent._lxcfs_present(),
            "environment_file": agent._write_environment(machine_id, cpus),
            "pids_limit": agent.config.pids_limit,
            "stop_timeout_s": agent.config.stop_timeout_s,
            "user_ca_file": agent._write_user_ca(machine_id, create=True),
            "host_id": agent.host,
            "cluster_id": agent.orphans.cluster_id,
        }

    def _import_failed(
        self, cmd: MachineImport, err: Exception, retriable: bool | None = None
    ) -> MachineImportFailed:
        return MachineImportFailed(
            machine_id=cmd.machine_id,
            host=self.agent.host,
            reason=_reason(err),
            retriable=isinstance(err, TransientError) if retriable is None else retriable,
        )


def _aware(at: datetime) -> datetime:
    """``at`` with a zone (a naive time is UTC, as every dockvm time is)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _mounted(path: Path) -> bool:
    """Whether ``path`` is a mountpoint now (/proc is memory: reading it never blocks)."""
    target = str(path)
    return any(
        line.split()[1] == target for line in Path("/proc/self/mounts").read_text().splitlines()
    )


def _create_fields(cmd: MachineImport) -> dict[str, Any]:
    """The create command inside an import."""
    return cmd.model_dump(include=set(ContainerCreate.model_fields))
