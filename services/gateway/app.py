"""Wiring of the gateway service: the one place adapters meet handlers."""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from libs.common.clock import utcnow
from libs.common.maven import MavenRepository
from libs.common.runner import ServiceContext

from .api import GatewayState, build_api, problem_middleware
from .api.framework import Api
from .api.hosts import QUARANTINE
from .api.policy import BUILT, POLICY
from .api.prometheus import add_prometheus_routes
from .api.releases import add_release_routes
from .built_images import BuiltImages
from .cluster import ClusterStore
from .console import mount_console
from .console.v1 import api_base
from .handlers import (
    BASTION_BINDINGS,
    BASTION_QUEUE,
    BINDINGS,
    ORPHAN_BINDINGS,
    ORPHAN_QUEUE,
    QUEUE,
    RELEASE_BINDINGS,
    RELEASE_QUEUE,
    bastion_handlers,
    build_handlers,
    orphan_handlers,
    release_handlers,
)
from .image_policy import PolicyStore
from .listing import MachineIndex
from .quarantine import QuarantineStore
from .service import Releases, SagaDriver, StoreDirectory
from .service.hosts import HostReports
from .service.prometheus import PrometheusClient
from .settings import GatewaySettings
from .store import GatewayStore, ReleaseStore

__all__ = ["bootstrap_admin", "lifespan"]

log = structlog.get_logger("gateway")


async def bootstrap_admin(store: GatewayStore, path: Path) -> str | None:
    """On first start, create the admin token and write it to ``path`` (0600); return it."""
    if await store.has_admin():
        return None
    token = f"dvm_{secrets.token_urlsafe(32)}"
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    await store.add_token(token, "admin", "admin")
    # Only the path: stdout goes to a log file, and only the 0600 file may hold the token.
    print(f"dockvm admin token written to {path} (mode 0600)", flush=True)
    log.warning("admin token created", path=str(path))
    return token


def _mount_http(app: web.Application, api: Api, settings: GatewaySettings) -> None:
    """The API's routes behind the problem middleware, and the console over them if on."""
    app.middlewares.append(problem_middleware)
    api.mount(app)
    if settings.console:
        mount_console(app, api_base(settings.bind_host, settings.port))


@asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[None]:
    """Wire the gateway service for the life of the process."""
    settings = ctx.settings
    assert isinstance(settings, GatewaySettings)
    index = MachineIndex(settings.list_refresh_s)
    store = GatewayStore(ctx.db, index, transitions_kept=settings.transitions_kept)
    await store.setup()
    await index.reload(store.all_summaries)
    driver = SagaDriver(store, ctx.publisher, settings)
    # Before any announcement: agents follow only lists of the cluster they adopted.
    driver.hosts.cluster_id = await ClusterStore(ctx.db).ensure()
    quarantine = QuarantineStore(ctx.db)
    await bootstrap_admin(store, settings.token_path())

    release_store = ReleaseStore(ctx.db)
    await release_store.setup()
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15))
    releases = Releases(
        release_store,
        ctx.publisher,
        StoreDirectory(store),
        settings.deploy_timeout_s,
        artifacts=MavenRepository(settings.maven_url, http),
        checks=store.checks,
    )

    api = build_api(GatewayState(store=store, driver=driver, rpc=ctx.rpc, settings=settings))
    add_release_routes(api, releases, release_store)
    add_prometheus_routes(ctx.http, PrometheusClient(settings.prometheus_url, http))
    api.provide(QUARANTINE, quarantine)
    policy = PolicyStore(ctx.db)
    api.provide(POLICY, policy)
    api.provide(BUILT, BuiltImages(ctx.db, policy))
    _mount_http(ctx.http, api, settings)

    handlers = build_handlers(driver)
    # No message-id dedupe: every handler is conditional on the machine's state (natural key),
    # so a redelivery is already a no-op, and two FerretDB writes per event are saved.
    await ctx.consume(QUEUE, BINDINGS, handlers, dedupe=False)
    await ctx.consume(RELEASE_QUEUE, RELEASE_BINDINGS, release_handlers(releases), dedupe=False)
    # Each bastion event's audit entry has the envelope id as _id: written once, no dedupe.
    await ctx.consume(BASTION_QUEUE, BASTION_BINDINGS, bastion_handlers(store), dedupe=False)
    # Each orphan report is written only if newer than what its document holds: no dedupe.
    reports = orphan_handlers(HostReports(quarantine))
    await ctx.consume(ORPHAN_QUEUE, ORPHAN_BINDINGS, reports, dedupe=False)
    await driver.resume()
    # A step sent as the broker went away, or its answer, may be lost: re-send every step in
    # flight once the connection is back, rather than after the step's timeout (2 min).
    ctx.on_reconnect(driver.resume, "saga-resume")
    ctx.every(settings.release_sweep_s, releases.sweep, "release-sweep")
    ctx.every(settings.saga_tick_s, driver.tick, "saga-tick", now=False)
    # Events a failed publish or a crash left in the outboxes; the first tick scans them all.
    ctx.every(settings.saga_tick_s, driver.outbox.tick, "machine-outbox")
    ctx.every(settings.saga_tick_s, store.repair_behind, "summary-repair")
    ctx.every(settings.saga_tick_s, releases.outbox.tick, "release-outbox")
    ctx.every(settings.host_check_s, driver.hosts.check_hosts, "host-check")
    # A short tick; the index itself decides when a reload is due (see listing.py).
    ctx.every(
        min(1.0, settings.list_refresh_s),
        lambda: index.refresh(store.all_summaries),
        "machine-index",
        now=False,
    )
    ctx.every(settings.known_announce_s, driver.hosts.announce_known, "machines-known", now=False)

    async def prune() -> None:
        at = utcnow()
        keys, audit = await store.prune(
            at - timedelta(seconds=settings.idempotency_retention_s),
            at - timedelta(days=settings.audit_retention_days),
        )
        if keys or audit:
            log.info("retention pruned", idempotency_keys=keys, audit_entries=audit)

    ctx.every(settings.prune_every_s, prune, "retention")
    try:
        yield
    finally:
        await http.close()
