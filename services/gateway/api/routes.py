"""The gateway's route table: every module's declared routes, assembled on one :class:`Api`.

Handlers live in one module per resource and read their dependencies from the aiohttp app
(:mod:`.deps`); the release routes are added by :func:`.releases.add_release_routes`.
"""

from __future__ import annotations

from . import (
    apps,
    audit,
    builds,
    grants,
    hosts,
    images,
    ips,
    machines,
    migrate,
    policy,
    pools,
    sessions,
    tokens,
    users,
)
from .deps import DRIVER, RPC, SETTINGS, STORE, GatewayState, Rpc
from .framework import Api
from .views import machine_out

__all__ = ["GatewayState", "Rpc", "build_api", "machine_out"]

# In this order in the OpenAPI document.
_MODULES = (
    machines, migrate, apps, hosts, pools, ips, images, builds, policy, tokens, audit, users,
    grants, sessions,
)


def build_api(state: GatewayState) -> Api:
    """Every module's routes on a new :class:`Api`, with the state they depend on."""
    api = Api()
    api.provide(STORE, state.store)
    api.provide(DRIVER, state.driver)
    api.provide(RPC, state.rpc)
    api.provide(SETTINGS, state.settings)
    for module in _MODULES:
        api.include(module.routes)
    return api
