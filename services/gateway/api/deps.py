"""What the route handlers depend on, under typed aiohttp app keys.

Handlers are module-level functions; they read the store, the saga driver, the bus RPC client
and the settings from ``request.app`` through these keys, which the assembled
:class:`~services.gateway.api.framework.Api` stores when it is mounted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from libs.common.contracts import Message
from libs.common.errors import TransientError

from ..service import Releases, ReleaseStore, SagaDriver
from ..settings import GatewaySettings
from ..store import GatewayStore

__all__ = [
    "DRIVER",
    "RELEASES",
    "RELEASE_STORE",
    "RPC",
    "SETTINGS",
    "STORE",
    "GatewayState",
    "Rpc",
    "rpc_call",
]


class Rpc(Protocol):
    """Port: request/reply over the bus."""

    async def request(
        self, msg: Message, *, routing_key: str | None = None, timeout: float = 10.0
    ) -> Message:
        """Send ``msg`` and return the reply."""
        ...


STORE = web.AppKey("gateway.store", GatewayStore)
DRIVER = web.AppKey("gateway.driver", SagaDriver)
RPC = web.AppKey("gateway.rpc", Rpc)
SETTINGS = web.AppKey("gateway.settings", GatewaySettings)
RELEASES = web.AppKey("gateway.releases", Releases)
RELEASE_STORE = web.AppKey("gateway.release_store", ReleaseStore)


@dataclass
class GatewayState:
    """What the route handlers use (provided to the app under the keys above)."""

    store: GatewayStore
    driver: SagaDriver
    rpc: Rpc
    settings: GatewaySettings


async def rpc_call(
    request: web.Request, msg: Message, routing_key: str | None = None, *, at_least_s: float = 0
) -> Message:
    """Ask another service over the bus within the gateway's RPC timeout (or ``at_least_s``, if
    longer, for a question known to take time); name it on failure."""
    app = request.app
    timeout = max(app[SETTINGS].rpc_timeout_s, at_least_s)
    try:
        return await app[RPC].request(msg, routing_key=routing_key, timeout=timeout)
    except TransientError as err:
        raise TransientError(f"{msg.TYPE}: {err}") from err
