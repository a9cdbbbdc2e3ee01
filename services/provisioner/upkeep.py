"""The agent's periodic jobs: the heartbeat, the reconcile that reports this agent's containers,
heals what a reboot took and sweeps orphans (``orphans``: quarantine, release, purge), and the
re-plumbing after an engine start. Another agent's containers on the same engine (another
``dockvm.host`` or ``dockvm.cluster`` label, or no host label and no disk here) are never
counted, reported, healed or swept.

Docker labels are the agent's only truth, so each job reads the engine afresh, under the same
per-machine locks as the commands. The jobs read the engine through their own runtime (a lane with
its own small thread pool): listing every container takes seconds on a full host, and must not
hold the threads creates wait for. The heartbeat also refreshes the host's size and free disk
that creates are checked against (``capacity``). A heartbeat and a ``container.observed`` state
the current state in full, so one lost (a job whose publish fails is logged and runs again at its
next tick) is made good by the next.

Every round of a job is bounded (``DOCKVM_UPKEEP_TIMEOUT_S``): a round still running then is cut
(cancelled, which kills its host commands), logged and raised as a :class:`TransientError`, so
one stuck round never stops the next ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from ipaddress import IPv4Address

import structlog

from libs.common.clock import utcnow
from libs.common.contracts.provisioner import (
    ContainerObserved,
    HostHeartbeat,
    Resources,
)
from libs.common.errors import DomainError, TransientError

from .adapters.runtime import ContainerInfo, ContainerRuntime
from .domain import LABEL_HOST, LABEL_VLAN, Limits, Ownership, allocation
from .service import ProvisionerService

__all__ = ["DEFAULT_TIMEOUT_S", "HostUpkeep", "UpkeepTimedOut"]

log = structlog.get_logger("provisioner")
MINE, FOREIGN = Ownership.MINE, Ownership.FOREIGN

DEFAULT_TIMEOUT_S = 300.0


class UpkeepTimedOut(TransientError):
    """A round of a periodic job ran past its bound and was cut."""

    def __init__(self, job: str, timeout_s: float) -> None:
        super().__init__(f"{job} did not finish within {timeout_s:g}s; cut, the next round runs")
        self.job = job


class HostUpkeep:
    """The periodic jobs of one host's agent, on the same ports and machine locks."""

    def __init__(
        self,
        agent: ProvisionerService,
        runtime: ContainerRuntime | None = None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.agent = agent
        self.timeout_s = timeout_s
        self.runtime = runtime or agent.runtime
        self.volumes = agent.volumes
        self.network = agent.network
        self.publisher = agent.publisher

    @asynccontextmanager
    async def _bounded(self, job: str, **context: str) -> AsyncIterator[None]:
        """Cut the round at ``timeout_s``: log it and raise :class:`UpkeepTimedOut`."""
        try:
            async with asyncio.timeout(self.timeout_s):
                yield
        except TimeoutError as err:
            log.error("periodic job cut", job=job, timeout_s=self.timeout_s, **context)
            raise UpkeepTimedOut(job, self.timeout_s) from err

    async def heartbeat(self) -> HostHeartbeat:
        """Publish ``host.heartbeat``: capacity, allocation, images, version (bounded)."""
        async with self._bounded("heartbeat"):
            return await self._heartbeat()

    async def _managed(self) -> tuple[list[ContainerInfo], set[str]]:
        """This agent's containers (and legacy ones with their disk here), and the ids of every
        labelled container on the engine: another agent's on the same engine is never touched."""
        everyone = await self.runtime.list_managed()
        ours = [info for info in everyone if await self._touchable(info)]
        return ours, {i.machine_id for i in everyone}

    async def _heartbeat(self) -> HostHeartbeat:
        config = self.agent.config
        infos, _ = await self._managed()
        limits = [
            Limits(i.cpus, i.memory, await self.volumes.size(i.machine_id) or 0) for i in infos
        ]
        alloc = allocation(limits)
        cpus, memory, disk_total = await self.agent.capacity.refresh(self.runtime)
        beat = HostHeartbeat(
            host_id=config.host_id,
            dc=config.dc,
            labels=dict(config.labels),
            capacity=Resources(cpus=cpus, memory=memory, disk=disk_total),
            allocated=Resources(cpus=alloc.cpus, memory=alloc.memory, disk=alloc.disk),
            machines=len(infos),
            images=await self.runtime.images(),
            version=config.version,
            at=utcnow(),
            min_disk_bytes=self.agent.capacity.min_disk,
        )
        await self.publisher.publish(beat)
        return beat

    async def reconcile(self) -> list[ContainerObserved]:
        """Report and heal this agent's containers; release, quarantine and purge orphans
        (bounded)."""
        async with self._bounded("reconcile"):
            return await self._reconcile()

    async def _reconcile(self) -> list[ContainerObserved]:
        orphans = self.agent.orphans
        infos, everyone = await self._managed()
        observed = []
        for info in infos:
            async with self.agent.lock(info.machine_id):
                await self._heal(info)
            obs = ContainerObserved(
                host=self.agent.host,
                machine_id=info.machine_id,
                container_id=info.id,
                state=info.state,
                ip=IPv4Address(info.ip) if info.ip else None,
                cpus=info.cpus,
                memory=info.memory,
                disk=await self.volumes.size(info.machine_id),
                vlan_id=int(info.labels[LABEL_VLAN]) if LABEL_VLAN in info.labels else None,
                orphan=orphans.is_orphan(info.machine_id),
            )
            await self.publisher.publish(obs)
            observed.append(obs)
        # Only this host's (and cluster's) containers may be orphans, and a disk under this
        # state dir without any container (a create cut short and never repeated).
        mine = {i.machine_id for i in infos if orphans.owner(i.labels, has_disk=True) is MINE}
        disks = set(await self.volumes.list()) - everyone
        await orphans.sweep(mine | disks, self.runtime)
        return observed

    async def _heal(self, info: ContainerInfo) -> None:
        """Put back what a host reboot or a dockerd restart took: the disk, the OVS port, the
        SSH guard (and a changed bastion CA key)."""
        if not info.running:
            return
        try:
            if await self.volumes.mount(info.machine_id):
                # It started on an empty mountpoint: restart it onto the real disk.
                log.warning("disk was not mounted, restarting machine", machine_id=info.machine_id)
                info = await self.runtime.restart(info.machine_id, self.agent.config.stop_timeout_s)
            await self.network.plumb(info)
            await self.agent.secure(info)
        except (DomainError, TransientError) as err:
            log.error("heal failed", machine_id=info.machine_id, error=str(err))

    async def _touchable(self, info: ContainerInfo) -> bool:
        """Whether this agent may act on the container (not another agent's): labelled with
        this host, or made before that label with its disk under this state dir."""
        has_disk = LABEL_HOST not in info.labels and await self.volumes.size(info.machine_id)
        return self.agent.orphans.owner(info.labels, has_disk=bool(has_disk)) is not FOREIGN

    async def replumb(self, machine_id: str) -> None:
        """After the engine reports a start: re-attach the machine's network port and its SSH
        guard (bounded; a failure is logged, so the stream of starts goes on)."""
        try:
            async with self._bounded("replumb", machine_id=machine_id):
                async with self.agent.lock(machine_id):
                    info = await self.runtime.find(machine_id)
                    if info is not None and await self._touchable(info):
                        await self.network.plumb(info)
                        await self.agent.secure(info)
        except (DomainError, TransientError) as err:
            log.error("re-plumb failed", machine_id=machine_id, error=str(err))
