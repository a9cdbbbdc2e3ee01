"""Wiring of the imagesync service: the one place adapters meet handlers.

HTTP: ``POST /v1/registry-events`` (the registries' notifications). Bus: queue ``imagesync``
takes ``image.pushed``, ``image.sync`` and the ``sync_jobs.list`` and ``registry.catalog``
queries. Periodic: the catalog
reconcile (at start, then every ``reconcile_interval_s``) and the retention job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

import structlog

from libs.common.contracts.imagesync import ImageSync
from libs.common.runner import ServiceContext
from libs.common.settings import SettingsError

from .adapters.registry import HttpRegistry, new_session
from .catalog import RegistryCatalog
from .copier import Copier
from .handlers import BusHandlers, Webhook
from .service import RetryPolicy, SyncService
from .settings import ImagesyncSettings
from .store import MongoBlobIndex, SyncStore

log = structlog.get_logger("imagesync")
QUEUE = "imagesync"
RETENTION = timedelta(days=30)


def _secret(settings: ImagesyncSettings) -> str:
    if settings.webhook_secret is not None:
        secret = settings.webhook_secret.get_secret_value().strip()
    else:
        path = settings.state_dir / "webhook.secret"
        try:
            secret = path.read_text().strip()
        except OSError as err:
            raise SettingsError(
                f"imagesync: no webhook secret: set DOCKVM_WEBHOOK_SECRET or write {path} ({err})"
            ) from err
    if len(secret) < 16:
        raise SettingsError("imagesync: the webhook secret must have at least 16 characters")
    return secret


@asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[None]:
    """Wire the imagesync service for the life of the process."""
    settings = ctx.settings
    assert isinstance(settings, ImagesyncSettings)
    secret = _secret(settings)
    store = SyncStore(ctx.db)
    await store.setup()
    index = MongoBlobIndex(ctx.db)
    async with new_session(settings.registry_timeout_s) as session:
        registries = [HttpRegistry(ep, session) for ep in settings.topology()]
        service = SyncService(
            registries,
            store,
            Copier(index, settings.blob_concurrency),
            RetryPolicy(
                attempts=settings.sync_attempts,
                initial_s=settings.sync_backoff_initial_s,
                max_s=settings.sync_backoff_max_s,
            ),
            max_concurrent_jobs=settings.max_concurrent_jobs,
            names_max_age_s=settings.catalog_names_s,
        )
        webhook = Webhook(secret, store, service, ctx.publisher)
        ctx.http.router.add_post("/v1/registry-events", webhook.handle)

        catalog = RegistryCatalog(service.registries, settings.catalog_cache_s, service.names)
        handlers = BusHandlers(service, store, index, catalog).table()
        await ctx.consume(
            QUEUE,
            list(handlers),
            handlers,
            # Copies hold their message while they run: leave room for pushes and queries.
            prefetch=settings.max_concurrent_jobs * 4,
            # Every handler is idempotent by natural key (the job) or a read; the message-id
            # dedupe would only add two database writes to the push-to-available path.
            dedupe=False,
        )

        async def reconcile() -> None:
            for order in await service.reconcile():
                await ctx.publisher.publish(
                    ImageSync(
                        source=order.source,
                        target=order.target,
                        repo=order.repo,
                        tag=order.tag,
                        digest=order.digest,
                        reason="reconcile",
                    )
                )

        ctx.every(settings.reconcile_interval_s, reconcile, "catalog-reconcile")
        ctx.every(3600, lambda: store.prune(RETENTION), "prune", now=False)
        log.info("topology", registries={r.dc: r.host for r in registries})
        try:
            yield
        finally:
            await service.shutdown()
