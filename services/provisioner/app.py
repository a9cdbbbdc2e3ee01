"""Wiring of the provisioner service: the one place adapters meet handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import aiohttp
import structlog

from libs.common.bus import Publisher, queue_name
from libs.common.errors import DomainError, TransientError
from libs.common.maven import MavenRepository
from libs.common.runner import ServiceContext

from .adapters.bastion import NftSshGuard, UserCaKey, fetch_user_ca, parse_sources
from .adapters.host import HostCommands
from .adapters.network import make_network
from .adapters.runtime import RESYNC, DockerRuntime
from .adapters.shell import DockerMachineShell
from .adapters.transfer import DockerIdentity
from .adapters.volumes import make_volumes
from .deploy import Deployer
from .handlers import bus_handlers
from .migrate import Migrations
from .service import AgentConfig, ProvisionerService
from .settings import ProvisionerSettings
from .upkeep import HostUpkeep

__all__ = ["lifespan"]

log = structlog.get_logger("provisioner")


def _version() -> str:
    try:
        return version("dockvm")
    except PackageNotFoundError:
        return "0+unknown"


def _agent_config(settings: ProvisionerSettings) -> AgentConfig:
    """The agent's settings, from the service's."""
    return AgentConfig(
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
        orphan_retention_s=settings.orphan_retention_s,
        orphan_sweep_cap=settings.orphan_sweep_cap,
        orphan_sweep_fraction=settings.orphan_sweep_fraction,
        orphans_dir=settings.state_dir / "orphans",
        create_parallelism=settings.create_parallelism,
        files_dir=settings.state_dir / "machines",
    )


def _agent(
    settings: ProvisionerSettings, runtime: DockerRuntime, publisher: Publisher
) -> ProvisionerService:
    """The agent on the network and volume drivers the settings name."""
    network = make_network(
        settings.network_driver,
        runtime,
        prefix=settings.network_prefix,
        trunk=settings.macvlan_trunk,
        ovs_bridge=settings.ovs_bridge,
        command_timeout_s=settings.host_command_timeout_s,
        ovs_uplink=settings.ovs_uplink,
        ovs_router=settings.ovs_router,
    )
    volumes = make_volumes(
        settings.volume_driver,
        settings.state_dir,
        vg=settings.lvm_vg,
        command_timeout_s=settings.host_command_timeout_s,
    )
    guard = None
    if settings.ssh_guard:
        sources = parse_sources(settings.bastion_source)
        guard = NftSshGuard(sources, HostCommands(settings.host_command_timeout_s))
    user_ca = UserCaKey(settings.ca_pubkey_path)
    user_ca.current()  # read at start, so an absent key is reported now, not at a first create
    return ProvisionerService(
        _agent_config(settings), runtime, network, volumes, publisher,
        guard=guard, user_ca=user_ca,
    )  # fmt: skip


def _deployer(settings: ProvisionerSettings, session: aiohttp.ClientSession) -> Deployer:
    """The deployer, on the machines' shells and the Maven repository."""
    return Deployer(
        DockerMachineShell(settings.docker_url),
        MavenRepository(settings.maven_url, session),
        session,
        settings.state_dir / "deploy",
        settings.host_id,
    )


@asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[None]:
    """Wire the provisioner service for the life of the process."""
    settings = ctx.settings
    assert isinstance(settings, ProvisionerSettings)
    upkeep_workers = settings.upkeep_docker_workers
    runtime = DockerRuntime(
        settings.docker_url,
        workers=settings.docker_workers,
        connections=settings.docker_workers + upkeep_workers,
    )
    agent = _agent(settings, runtime, ctx.publisher)
    # Heartbeat and reconcile inspect every container: on their own threads, not the creates'.
    upkeep = HostUpkeep(
        agent, runtime.lane(upkeep_workers, "docker-upkeep"), timeout_s=settings.upkeep_timeout_s
    )
    session = aiohttp.ClientSession()
    identity = DockerIdentity(settings.docker_url)
    export_url = settings.export_url or f"http://{settings.bind_host}:{settings.port}"
    migrations = Migrations(agent, identity, session, export_url)
    migrations.exports.add_routes(ctx.http)
    ctx.add_check("docker", runtime.host_resources)
    try:
        # Reconcile first, so a create cut short by a crash is seen before commands flow; if
        # the engine is not answering yet, the periodic reconcile catches up.
        await _reconcile(upkeep, "initial reconcile failed")
        await ctx.consume(
            queue_name("provisioner", settings.host_id),
            [f"host.{settings.host_id}.#"],
            bus_handlers(agent, _deployer(settings, session), migrations),
            # Handlers are idempotent by machine_id; a message-id lease would instead hold a
            # create redelivered after a crash (kill -9) until the lease expires.
            dedupe=False,
            # A full width of creates runs while as many more wait for a slot, so a freed slot
            # never waits for a delivery.
            prefetch=settings.create_parallelism * 2,
        )
        ctx.every(settings.heartbeat_interval_s, upkeep.heartbeat, "heartbeat")
        ctx.every(settings.reconcile_interval_s, upkeep.reconcile, "reconcile", now=False)
        # A bastion on another host: its CA key comes over the bus (none asked while the file
        # is here); running machines get it at the next reconcile.
        if agent.user_ca is not None:
            user_ca = agent.user_ca
            ctx.every(settings.reconcile_interval_s, lambda: fetch_user_ca(user_ca, ctx.rpc),
                      "bastion-ca")  # fmt: skip
        # An OVS port and the SSH guard go with the network namespace every start replaces.
        if agent.network.kind == "ovs" or agent.guard is not None:
            ctx.spawn(_replumb_on_start(runtime, upkeep), "replumb")
        log.info(
            "provisioner wired",
            network=settings.network_driver,
            volumes=settings.volume_driver,
        )
        yield
    finally:
        await session.close()
        identity.close()
        runtime.close()


async def _reconcile(upkeep: HostUpkeep, failure: str) -> None:
    """One reconcile outside the periodic job, whose failure is logged, not fatal."""
    try:
        await upkeep.reconcile()
    except (DomainError, TransientError) as err:
        log.error(failure, error=str(err))


async def _replumb_on_start(runtime: DockerRuntime, upkeep: HostUpkeep) -> None:
    """Docker gives a container a fresh network namespace on every start: re-add its port."""
    async for machine_id in runtime.starts():
        if machine_id == RESYNC:
            await _reconcile(upkeep, "reconcile after the events stream came back failed")
        else:
            await upkeep.replumb(machine_id)
