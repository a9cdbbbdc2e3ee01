"""Wiring of the builder: the one place adapters meet handlers.

Bus: queue ``builder`` takes the RPCs (submit and queries) and ``builder.work`` the builds
themselves, ``builder_concurrency`` at a time, on their own channel so that a long build never
holds up an answer. At start, builds stored but never queued (a publish lost to a crash) are
queued again. Periodic: old log chunks are pruned.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import aiohttp
import structlog

from libs.common.contracts.builder import RPC_QUEUE, WORK_QUEUE
from libs.common.runner import ServiceContext
from libs.common.settings import SettingsError

from .adapters import DockerEngine, HttpRegistries
from .handlers import RPC_TYPES, WORK_TYPES, rpc_handlers, work_handlers
from .service import Builds, Runner
from .settings import BuilderSettings
from .store import MongoBuildStore

log = structlog.get_logger("builder.app")
LOG_RETENTION = timedelta(days=30)


@asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[None]:
    """Wire the builder for the life of the process."""
    settings = ctx.settings
    assert isinstance(settings, BuilderSettings)
    hosts = settings.registry_hosts()
    if settings.dc not in hosts:
        raise SettingsError(
            f"builder: DOCKVM_DC={settings.dc} has no registry in "
            f"DOCKVM_REGISTRIES ({', '.join(hosts)})"
        )
    store = MongoBuildStore(ctx.db)
    engine = DockerEngine(settings.docker_url, settings.builder_network)
    runner = Runner(
        engine=engine,
        dc=settings.dc,
        registry=hosts[settings.dc],
        other_dcs=tuple(dc for dc in hosts if dc != settings.dc),
        timeout_s=settings.build_timeout_s,
        attempts=settings.build_attempts,
        settle_s=settings.verify_settle_s,
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        builds = Builds(store, runner, HttpRegistries(hosts, http), ctx.publisher)
        ctx.add_check("docker", engine.ping)
        await ctx.consume(RPC_QUEUE, RPC_TYPES, rpc_handlers(builds), dedupe=False)
        await ctx.consume(
            WORK_QUEUE,
            WORK_TYPES,
            work_handlers(builds),
            dedupe=False,
            prefetch=settings.builder_concurrency,
        )
        requeued = await builds.requeue()
        if requeued:
            log.info("queued builds queued again", count=requeued)
        ctx.every(3600, lambda: store.prune(LOG_RETENTION), "prune", now=False)
        log.info("builder ready", dc=settings.dc, registry=runner.registry)
        yield
