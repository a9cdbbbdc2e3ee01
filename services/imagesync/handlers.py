"""imagesync's entrypoints: the registries' webhook and the bus handlers (thin).

Delivery guarantee: the webhook answers 2xx only after the notification is recorded in
``seen_events`` and its ``image.pushed`` is confirmed by RabbitMQ; otherwise it answers 503 and
the registry sends it again. Bus handlers are at least once and idempotent: a copy is keyed by
its natural key in ``sync_jobs``, so a redelivered ``image.pushed`` or ``image.sync`` finds its
job done (or held by the worker running it) and copies nothing twice.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass

import structlog
from aiohttp import web
from prometheus_client import Counter, Histogram
from pymongo.errors import PyMongoError

from libs.common.bus import Handler, MessageContext, Publisher
from libs.common.contracts.imagesync import (
    ImagePushed,
    ImageSync,
    RegistryCatalogList,
    RegistryCatalogListed,
    SyncJobsList,
    SyncJobsListed,
)
from libs.common.errors import TransientError, ValidationFailed

from .catalog import RegistryCatalog
from .domain import (
    EVENTS_MEDIA_TYPE,
    PushedManifest,
    classify_event,
    event_host,
    parse_envelope,
    push_key,
)
from .ports import BlobIndex, Registry
from .service import SyncService
from .store import SyncStore

__all__ = ["BusHandlers", "Webhook"]

log = structlog.get_logger("imagesync.handlers")
_EVENTS = Counter("dockvm_imagesync_webhook_events_total", "Notifications by outcome", ["outcome"])
_LATENCY = Histogram("dockvm_imagesync_webhook_seconds", "Webhook answer time")
DC_HEADER = "X-Dockvm-Dc"
REPLICA_HEADER = "X-Dockvm-Replica"  # which replica of the dc notified (kept for the record)


def _bad(status: int, error: str, reason: str) -> web.Response:
    return web.json_response({"error": error, "reason": reason}, status=status)


@dataclass
class Webhook:
    """``POST /v1/registry-events``: authenticate, record, publish; replication is async."""

    secret: str
    store: SyncStore
    service: SyncService
    publisher: Publisher

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {self.secret}"
        return hmac.compare_digest(given.encode(), expected.encode())

    async def handle(self, request: web.Request) -> web.Response:
        """Answer one notification request."""
        started = time.perf_counter()
        try:
            return await self._handle(request)
        except (PyMongoError, TransientError) as err:
            # Nothing was acknowledged: the registry keeps the event and sends it again.
            log.error("notification not recorded", error=str(err))
            return _bad(503, "unavailable", "state or bus unavailable, send it again")
        finally:
            _LATENCY.observe(time.perf_counter() - started)

    async def _handle(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            _EVENTS.labels("unauthorized").inc()
            return _bad(401, "unauthorized", "missing or wrong bearer secret")
        if request.content_type != EVENTS_MEDIA_TYPE:
            return _bad(
                400,
                "invalid",
                f"content type must be {EVENTS_MEDIA_TYPE}, got {request.content_type!r}",
            )
        try:
            events = parse_envelope(await request.read())
        except ValidationFailed as err:
            return _bad(400, "invalid", str(err))

        # Decide every event first: a refusal must leave nothing recorded or published.
        actionable: list[tuple[PushedManifest, Registry]] = []
        ignored = 0
        for ev in events:
            decision = classify_event(ev)
            if not isinstance(decision, PushedManifest):
                ignored += 1
                _EVENTS.labels("ignored").inc()
                log.debug("notification ignored", event_id=decision.event_id, why=decision.why)
                continue
            registry = self._source(request, ev)
            if registry is None:
                return _bad(
                    400,
                    "unknown_registry",
                    f"event {decision.event_id} comes from a registry not in the topology "
                    f"(dc header {request.headers.get(DC_HEADER)!r}, host {event_host(ev)!r})",
                )
            actionable.append((decision, registry))

        accepted: list[str] = []
        duplicates = 0
        for decision, registry in actionable:
            outcome = await self._record(decision, registry, request.headers.get(REPLICA_HEADER))
            if outcome == "unavailable":
                return _bad(503, "unavailable", "the bus is unavailable, send it again")
            if outcome == "duplicate":
                duplicates += 1
            else:
                accepted.append(decision.event_id)
        return web.json_response(
            {"accepted": accepted, "duplicates": duplicates, "ignored": ignored}, status=202
        )

    async def _record(
        self, decision: PushedManifest, registry: Registry, replica: str | None
    ) -> str:
        """Record and publish one push: ``accepted``, ``duplicate`` or ``unavailable``."""
        # Keyed by the push, not the event id: both replicas of a dc may report one push.
        key = push_key(registry.dc, decision)
        if not await self.store.record_event(
            registry.dc,
            key,
            {
                "repo": decision.repo,
                "tag": decision.tag,
                "digest": decision.digest,
                "event_id": decision.event_id,
                "replica": replica,
            },
        ):
            _EVENTS.labels("duplicate").inc()
            return "duplicate"
        try:
            await self.publisher.publish(
                ImagePushed(
                    registry=registry.host,
                    dc=registry.dc,
                    repo=decision.repo,
                    tag=decision.tag,
                    digest=decision.digest,
                    media_type=decision.media_type,
                    size=decision.size,
                    event_id=decision.event_id,
                    blobs=list(decision.blobs),
                ),
                id=f"registry-event.{key}",
            )
        except TransientError as err:
            await self.store.forget_event(key)
            log.error("cannot publish image.pushed", error=str(err))
            return "unavailable"
        await self.store.event_published(key)
        _EVENTS.labels("accepted").inc()
        log.info(
            "push recorded",
            dc=registry.dc,
            repo=decision.repo,
            tag=decision.tag,
            digest=decision.digest,
            event_id=decision.event_id,
            replica=replica,
            blobs=len(decision.blobs),
        )
        return "accepted"

    def _source(self, request: web.Request, ev: dict) -> Registry | None:
        dc = request.headers.get(DC_HEADER)
        if dc and dc in self.service.registries:
            return self.service.registries[dc]
        host = event_host(ev)
        return self.service.by_host(host) if host else None


@dataclass
class BusHandlers:
    """Handlers of the ``imagesync`` queue."""

    service: SyncService
    store: SyncStore
    index: BlobIndex
    catalog: RegistryCatalog

    async def _learn(self, evt: ImagePushed) -> None:
        # The pushed image's blobs now live in its repository: later copies into this dc
        # mount them from there instead of sending them again.
        for digest in evt.blobs:
            await self.index.add(evt.dc, digest, evt.repo)

    async def on_pushed(self, evt: ImagePushed, ctx: MessageContext) -> None:
        """Copy a push to every other dc at once (one job per target, each idempotent)."""
        if evt.dc not in self.service.registries:
            log.warning("push from a dc outside the topology", dc=evt.dc)
            return
        # Running the copies here rather than fanning out image.sync saves a bus hop on the
        # push-to-available path; each target's job still fails or succeeds on its own.
        self.service.names.learn(evt.dc, evt.repo)
        await asyncio.gather(
            self.store.remember_tag(evt.repo, evt.tag, evt.digest, evt.dc),
            self._learn(evt),
            *(
                self.service.sync(
                    ImageSync(
                        source=evt.dc,
                        target=target,
                        repo=evt.repo,
                        tag=evt.tag,
                        digest=evt.digest,
                        reason="push",
                    ),
                    ctx.publish,
                )
                for target in self.service.targets_of(evt.dc)
            ),
        )

    async def on_sync(self, cmd: ImageSync, ctx: MessageContext) -> None:
        """Run the copy; failures end as ``image.sync_failed``, not as a rejected message."""
        await self.service.sync(cmd, ctx.publish)

    def table(self) -> dict[str, Handler]:
        """The queue's handlers by message type: the one source of its bindings too."""
        return {
            ImagePushed.TYPE: self.on_pushed,
            ImageSync.TYPE: self.on_sync,
            SyncJobsList.TYPE: self.on_list,
            RegistryCatalogList.TYPE: self.on_catalog,
        }

    async def on_list(self, query: SyncJobsList, ctx: MessageContext) -> SyncJobsListed:
        """Answer the ``sync_jobs.list`` RPC."""
        jobs = await self.store.list_jobs(
            state=query.state, repo=query.repo, target=query.target, limit=query.limit
        )
        return SyncJobsListed(jobs=jobs)

    async def on_catalog(
        self, query: RegistryCatalogList, ctx: MessageContext
    ) -> RegistryCatalogListed:
        """Answer the ``registry.catalog`` RPC from the registries themselves."""
        found = await self.catalog.holdings(dc=query.dc, prefix=query.prefix, limit=query.limit)
        return RegistryCatalogListed(registries=found)
