"""Wiring of the bastion: the one place adapters meet handlers and the SSH server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import structlog

from libs.common.contracts.bastion import COMMAND_QUEUE
from libs.common.runner import ServiceContext
from libs.common.settings import SettingsError

from .handlers import BINDINGS, handlers
from .hostkeys import HostKeyBook, agent_asker
from .keys import load_keys
from .machine import MachineConnector
from .relay import Relay
from .service import Access, Admin, LiveSessions, SessionPruner
from .settings import BastionSettings
from .sftp import SftpGate
from .sshd import listen
from .store import MongoBastionStore, MongoHostKeyPins, MongoMachineDirectory

log = structlog.get_logger("bastion.app")


async def _ssh_answers(host: str, port: int) -> None:
    """Readiness: the SSH server accepts a connection and greets with its version."""
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    reader, writer = await asyncio.open_connection(host, port)
    try:
        banner = await reader.readline()
        if not banner.startswith(b"SSH-2.0-"):
            raise RuntimeError(f"ssh port answered {banner[:40]!r}")
    finally:
        writer.close()


@asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[None]:
    """Wire the bastion for the life of the process."""
    settings = ctx.settings
    assert isinstance(settings, BastionSettings)
    keys = await asyncio.to_thread(load_keys, settings.state_dir)
    store = MongoBastionStore(ctx.db)
    live = LiveSessions(
        store,
        ctx.publisher,
        owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        idle_timeout_s=settings.bastion_idle_timeout_s,
        max_session_s=settings.bastion_max_session_s,
    )
    closed = await live.recover()
    if closed:
        log.warning("sessions of a previous bastion closed", count=closed)
    await live.refresh_rules()
    access = Access(store, MongoMachineDirectory(ctx.db), ctx.publisher)
    book = HostKeyBook(MongoHostKeyPins(ctx.db), agent_asker(ctx.rpc, timeout_s=5.0))
    machines = MachineConnector(
        keys, settings.bastion_cert_ttl_s, settings.bastion_connect_timeout_s, book
    )
    relay = Relay(access, live, machines, settings.state_dir)
    await ctx.consume(COMMAND_QUEUE, BINDINGS, handlers(Admin(store, live), keys), dedupe=False)
    try:
        server = await listen(
            settings.bastion_ssh_host,
            settings.bastion_ssh_port,
            keys,
            access,
            relay,
            SftpGate(access, live, machines, ctx.publisher),
            login_timeout_s=settings.bastion_login_timeout_s,
        )
    except OSError as err:
        raise SettingsError(
            f"bastion: cannot listen for SSH on "
            f"{settings.bastion_ssh_host}:{settings.bastion_ssh_port}: {err}"
        ) from err
    ctx.add_check("ssh", partial(_ssh_answers, settings.bastion_ssh_host, server.get_port()))
    ctx.every(settings.bastion_watch_interval_s, live.watch, "watch-sessions")
    ctx.every(10, live.refresh_rules, "refresh-rules", now=False)
    pruner = SessionPruner(
        store,
        settings.bastion_dir() / "recordings",
        settings.bastion_session_retention_s,
        settings.bastion_prune_batch,
    )
    ctx.every(settings.bastion_prune_interval_s, pruner.prune, "prune-sessions")
    log.info(
        "ssh listening",
        host=settings.bastion_ssh_host,
        port=server.sockets[0].getsockname()[1] if server.sockets else None,
    )
    try:
        yield
    finally:
        live.end_where(lambda _s: True, "bastion_shutdown")
        # Give the relays a moment to record how their sessions ended before the bus and the
        # database close; what is still live then is closed at the next start (``recover``).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(live.wait_none_live(), settings.shutdown_grace_s / 2)
        server.close()
        await server.wait_closed()
