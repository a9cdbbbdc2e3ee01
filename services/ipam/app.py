"""Wiring of the ipam service: the one place adapters meet handlers."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from libs.common.runner import ServiceContext

from .handlers import COMMAND_KEYS, QUERY_KEYS, command_handlers, query_handlers
from .service import Ipam
from .settings import IpamSettings
from .store import MongoIpamStore

COMMAND_QUEUE = "ipam"
QUERY_QUEUE = "ipam.queries"


@asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[None]:
    """Wire the ipam service for the life of the process."""
    settings = ctx.settings
    assert isinstance(settings, IpamSettings)
    store = MongoIpamStore(ctx.db)
    await store.setup()
    ipam = Ipam(
        store,
        owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
        block_size=settings.ipam_block_size,
        pool_cache_s=settings.ipam_pool_cache_s,
    )
    await ctx.consume(COMMAND_QUEUE, COMMAND_KEYS, command_handlers(ipam))
    # Queries are reads: no dedupe bookkeeping, so an RPC costs no write.
    await ctx.consume(QUERY_QUEUE, QUERY_KEYS, query_handlers(ipam), dedupe=False)
    yield
