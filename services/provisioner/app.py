"""Wiring of the provisioner service: the one place adapters meet handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import aiohttp
import structlog

from libs.common.bus import MessageContext, queue_name
from libs.common.contracts.releases import Deploy, DeployFailed, DeploySucceeded
from libs.common.errors import DomainError, TransientError
from libs.common.maven import MavenRepository
from libs.common.runner import ServiceContext

from .adapters.network import make_network
from .adapters.runtime import RESYNC, DockerRuntime
from .adapters.shell import DockerMachineShell
from .adapters.volumes import make_volumes
from .deploy import Deployer
from .handlers import AgentConfig, Provisioner
from .settings import ProvisionerSettings

__all__ = ["lifespan"]

log = structlog.get_logger("provisioner")


def _version() -> str:
    try:
        return version("dockvm")
    except PackageNotFoundError:
        return "0+unknown"


@asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[None]:
    """Wire the provisioner service for the life of the process."""
    settings = ctx.settings
    assert isinstance(settings, ProvisionerSettings)
    runtime = DockerRuntime(settings.docker_url, workers=settings.docker_workers)
    network = make_network(
        settings.network_driver,
        runtime,
        prefix=settings.network_prefix,
        trunk=settings.macvlan_trunk,
        ovs_bridge=settings.ovs_bridge,
    )
    volumes = make_volumes(settings.volume_driver, settings.state_dir, vg=settings.lvm_vg)
    agent = Provisioner(
        AgentConfig(
            host_id=settings.host_id,
            dc=settings.dc,
            version=_version(),
            labels=tuple(sorted(settings.labels.items())),
            lxcfs_path=settings.lxcfs_path,
            pids_limit=settings.pids_limit,
            min_memory=settings.min_memory,
            memory_margin=settings.memory_margin,
            stop_timeout_s=settings.stop_timeout_s,
            orphan_grace_s=settings.orphan_grace_s,
            files_dir=settings.state_dir / "machines",
        ),
        runtime,
        network,
        volumes,
        ctx.publisher,
    )
    session = aiohttp.ClientSession()
    deployer = Deployer(
        DockerMachineShell(settings.docker_url),
        MavenRepository(settings.maven_url, session),
        session,
        settings.state_dir / "deploy",
        settings.host_id,
    )

    async def on_deploy(cmd: Deploy, mctx: MessageContext) -> DeploySucceeded | DeployFailed:
        """``host.<id>.deploy`` → ``deploy.succeeded`` or ``deploy.failed``."""
        try:
            result: DeploySucceeded | DeployFailed = await deployer.run(cmd)
        except DomainError as err:
            # Every command gets its answer, even one the deployer refuses outright.
            result = DeployFailed(
                release_id=cmd.release_id,
                machine_id=cmd.machine_id,
                host=settings.host_id,
                version=cmd.artifact.version,
                reason=err.reason,
                detail=str(err),
                action=cmd.action,
            )
        await mctx.publish(result)
        return result

    ctx.add_check("docker", runtime.host_resources)
    try:
        # Reconcile first, so a create cut short by a crash is seen before commands flow; if
        # the engine is not answering yet, the periodic reconcile catches up.
        try:
            await agent.reconcile()
        except (DomainError, TransientError) as err:
            log.error("initial reconcile failed", error=str(err))
        await ctx.consume(
            queue_name("provisioner", settings.host_id),
            [f"host.{settings.host_id}.#"],
            {**agent.handlers(), Deploy.TYPE: on_deploy},
            # Handlers are idempotent by machine_id; a message-id lease would instead hold a
            # create redelivered after a crash (kill -9) until the lease expires.
            dedupe=False,
            # Creates run in parallel up to the Docker pool; more would only queue there.
            prefetch=settings.docker_workers * 2,
        )
        ctx.every(settings.heartbeat_interval_s, agent.heartbeat, "heartbeat")
        ctx.every(settings.reconcile_interval_s, agent.reconcile, "reconcile", now=False)
        if network.kind == "ovs":
            ctx.spawn(_replumb_on_start(runtime, agent), "replumb")
        log.info(
            "provisioner wired",
            network=settings.network_driver,
            volumes=settings.volume_driver,
        )
        yield
    finally:
        await session.close()
        runtime.close()


async def _replumb_on_start(runtime: DockerRuntime, agent: Provisioner) -> None:
    """Docker gives a container a fresh network namespace on every start: re-add its port."""
    async for machine_id in runtime.starts():
        if machine_id == RESYNC:
            try:
                await agent.reconcile()
            except (DomainError, TransientError) as err:
                log.error("reconcile after the events stream came back failed", error=str(err))
        else:
            await agent.replumb(machine_id)
