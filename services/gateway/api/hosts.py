"""The ``/v1/hosts`` route: each Docker host's liveness, capacity and what the gateway placed."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.common.clock import utcnow

from ..domain import HostView
from ..domain.models import HostOut
from ..service import host_views
from .deps import SETTINGS, STORE
from .framework import ANY, RouteTable, json_response

__all__ = ["routes"]

routes = RouteTable()


def _host_out(view: HostView, host: dict[str, Any]) -> dict[str, Any]:
    """The API view of one host, as JSON data."""
    return HostOut(
        id=view.host_id,
        dc=host["dc"],
        status=view.status,
        last_seen=host["last_seen"],
        capacity={
            "cpus": view.capacity.cpus,
            "memory": view.capacity.memory,
            "disk": view.capacity.disk,
        },
        allocated={
            "cpus": view.allocated.cpus,
            "memory": view.allocated.memory,
            "disk": view.allocated.disk,
        },
        machines=host.get("machines", 0),
        labels=host.get("labels") or {},
        version=host.get("version"),
    ).model_dump(mode="json")


@routes.route("GET", "/v1/hosts", roles=ANY, summary="List hosts", response=None)
async def list_hosts(request: web.Request) -> web.Response:
    """Every host, dc by dc, with its status from heartbeat age and its allocations."""
    store, settings = request.app[STORE], request.app[SETTINGS]
    hosts = await store.list_hosts()
    at = utcnow()
    out = []
    for dc in sorted({h["dc"] for h in hosts}):
        in_dc = [h for h in hosts if h["dc"] == dc]
        views = host_views(in_dc, await store.allocations(dc), settings, at)
        out += [_host_out(view, h) for view, h in zip(views, in_dc, strict=True)]
    return json_response({"items": out})
