"""Wiring of the gateway service: the one place adapters meet handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from libs.common.runner import ServiceContext


@asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[None]:
    """Wire the gateway service for the life of the process."""
    yield
