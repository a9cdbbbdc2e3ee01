"""The service runner: one anatomy for every dockvm process.

``main()`` parses arguments, loads settings, configures logging and runs the service until
SIGTERM or SIGINT. The service's ``lifespan`` (in its ``app.py``) wires adapters to handlers
through a :class:`ServiceContext`. Every service serves ``/healthz`` (alive), ``/readyz``
(its bus and database answer) and Prometheus ``/metrics`` on its own port.

Shutdown is graceful: consumers stop taking messages, in-flight handlers finish (up to
``shutdown_grace_s``), background tasks are cancelled, then connections close.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from .bus import (
    AmqpPublisher,
    Consumer,
    Handler,
    MongoDedupe,
    QueueSpec,
    RpcClient,
    connect,
)
from .db import DatabaseUnavailable, mongo_client, ping
from .errors import TransientError
from .logging import configure_logging
from .settings import CommonSettings, HostAgentSettings, SettingsError, load_settings

__all__ = ["Lifespan", "ServiceContext", "main", "serve"]

log = structlog.get_logger("runner")
DEDUPE_COLLECTION = "bus_processed"
DEDUPE_RETENTION = timedelta(days=7)


@dataclass
class ServiceContext:
    """Everything a service's lifespan wires its handlers to."""

    name: str
    settings: CommonSettings
    connection: AbstractRobustConnection
    publisher: AmqpPublisher
    rpc: RpcClient
    mongo: AsyncMongoClient
    db: AsyncDatabase
    http: web.Application
    consumers: list[Consumer] = field(default_factory=list)
    checks: dict[str, Callable[[], Awaitable[Any]]] = field(default_factory=dict)
    tasks: list[asyncio.Task] = field(default_factory=list)

    async def consume(
        self,
        queue: str,
        bindings: Iterable[str],
        handlers: dict[str, Handler],
        *,
        dedupe: bool = True,
        prefetch: int | None = None,
    ) -> Consumer:
        """Consume ``queue`` (bound to ``bindings``), dispatching each type to its handler."""
        channel = await self.connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=prefetch or self.settings.prefetch)
        spec = QueueSpec(queue, tuple(bindings), self.settings.delivery_limit)
        consumer = Consumer(
            channel,
            spec,
            handlers,
            self.publisher,
            dedupe=MongoDedupe(self.db[DEDUPE_COLLECTION], queue) if dedupe else None,
        )
        await consumer.start()
        self.consumers.append(consumer)
        return consumer

    def add_check(self, name: str, check: Callable[[], Awaitable[Any]]) -> None:
        """Add a readiness check; ``/readyz`` fails while it raises."""
        self.checks[name] = check

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task:
        """Run a background task for the life of the service."""
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.name}:{name}")
        self.tasks.append(task)
        return task

    def on_reconnect(self, fn: Callable[[], Awaitable[Any]], name: str) -> None:
        """Run ``fn`` in the background each time the bus connection comes back after a drop.

        What was in flight when the broker went away (a command published as the connection
        dropped, a reply lost with it) is not re-sent by RabbitMQ; a service that keeps such
        work (the gateway's sagas) re-sends it here instead of waiting for its timeouts.
        """

        async def run() -> None:
            try:
                await fn()
            except Exception:
                log.exception("reconnect job failed", job=name)

        def callback(*_: object) -> None:
            log.info("bus reconnected", job=name)
            self.spawn(run(), f"{name}-on-reconnect")

        self.connection.reconnect_callbacks.add(callback)

    def every(
        self, interval_s: float, fn: Callable[[], Awaitable[Any]], name: str, *, now: bool = True
    ) -> asyncio.Task:
        """Call ``fn`` every ``interval_s`` seconds; a failure is logged, not fatal."""

        async def loop() -> None:
            if not now:
                await asyncio.sleep(interval_s)
            while True:
                started = asyncio.get_running_loop().time()
                try:
                    await fn()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("periodic job failed", job=name)
                elapsed = asyncio.get_running_loop().time() - started
                await asyncio.sleep(max(0.0, interval_s - elapsed))

        return self.spawn(loop(), name)


Lifespan = Callable[[ServiceContext], AbstractAsyncContextManager[None]]

_CTX: web.AppKey[ServiceContext] = web.AppKey("dockvm_context", ServiceContext)
_READY: web.AppKey[asyncio.Event] = web.AppKey("dockvm_ready", asyncio.Event)


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "service": request.app[_CTX].name})


async def _readyz(request: web.Request) -> web.Response:
    ctx = request.app[_CTX]
    results: dict[str, str] = {}
    ok = request.app[_READY].is_set()
    if not ok:
        results["startup"] = "starting"
    results["bus"] = "ok" if not ctx.connection.is_closed else "closed"
    ok = ok and results["bus"] == "ok"
    for name, check in {"database": lambda: ping(ctx.db), **ctx.checks}.items():
        try:
            await asyncio.wait_for(check(), timeout=3)
            results[name] = "ok"
        except Exception as err:
            results[name] = f"failed: {err}"
            ok = False
    body = {"status": "ok" if ok else "unavailable", "service": ctx.name, "checks": results}
    return web.json_response(body, status=200 if ok else 503)


async def _metrics(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve(name: str, settings: CommonSettings, lifespan: Lifespan) -> None:
    """Run ``name`` until SIGTERM/SIGINT; raise a transient error if a dependency is down."""
    mongo = mongo_client(settings.mongo_url, app_name=f"dockvm-{name}")
    db = mongo[settings.mongo_db]
    connection: AbstractRobustConnection | None = None
    runner: web.AppRunner | None = None
    try:
        await ping(db)
        connection = await connect(settings.amqp_url, name=f"dockvm-{name}")
        app = web.Application()
        ready = asyncio.Event()
        ctx = ServiceContext(
            name=name,
            settings=settings,
            connection=connection,
            publisher=AmqpPublisher(connection, source=name),
            rpc=RpcClient(connection, source=name),
            mongo=mongo,
            db=db,
            http=app,
        )
        app[_CTX] = ctx
        app[_READY] = ready
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/readyz", _readyz)
        app.router.add_get("/metrics", _metrics)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        dedupe = MongoDedupe(db[DEDUPE_COLLECTION], name)
        ctx.every(3600, lambda: dedupe.prune(DEDUPE_RETENTION), "prune-dedupe", now=False)

        async with lifespan(ctx):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, settings.bind_host, settings.port)
            try:
                await site.start()
            except OSError as err:
                raise SettingsError(
                    f"{name}: cannot listen on {settings.bind_host}:{settings.port}: {err}"
                ) from err
            ready.set()
            log.info("service started", port=settings.port)
            await stop.wait()
            log.info("service stopping")
            ready.clear()
            for consumer in ctx.consumers:
                await consumer.stop(settings.shutdown_grace_s)
            for task in ctx.tasks:
                task.cancel()
            await asyncio.gather(*ctx.tasks, return_exceptions=True)
        await ctx.publisher.close()
        await ctx.rpc.close()
        log.info("service stopped")
    finally:
        if runner is not None:
            await runner.cleanup()
        if connection is not None:
            await connection.close()
        await mongo.close()


S = TypeVar("S", bound=CommonSettings)


def main(
    name: str,
    settings_cls: type[S],
    lifespan: Lifespan,
    argv: list[str] | None = None,
) -> None:
    """Entry point of ``python -m services.<name>``."""
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}")
    parser.add_argument("--port", type=int, help="HTTP port (health, metrics, API)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    if issubclass(settings_cls, HostAgentSettings):
        parser.add_argument("--host-id", help="this Docker host's id")
        parser.add_argument("--dc", help="this host's datacenter")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = load_settings(settings_cls, **overrides)
    except SettingsError as err:
        print(f"{name}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(name, settings.log_level, settings.log_json)
    if isinstance(settings, HostAgentSettings):
        structlog.contextvars.bind_contextvars(host_id=settings.host_id)
    try:
        asyncio.run(serve(name, settings, lifespan))
    except (TransientError, DatabaseUnavailable) as err:
        print(f"{name}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except SettingsError as err:
        print(str(err), file=sys.stderr)
        raise SystemExit(2) from None
