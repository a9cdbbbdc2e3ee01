"""The ``/v1/hosts`` routes: each Docker host's liveness, capacity and what the gateway placed;
one host's quarantined orphans and alerts, and the purge of a quarantined orphan (an RPC to the
host's agent, which alone deletes: the gateway only keeps what agents report)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field

from libs.common.bus import host_key
from libs.common.clock import utcnow
from libs.common.contracts import provisioner
from libs.common.contracts.provisioner import XFS_MIN_DISK_BYTES
from libs.common.errors import ConflictError, NotFoundError, TransientError

from ..domain import HostView
from ..domain.models import HostOut
from ..quarantine import QuarantineStore
from ..service import host_views
from .deps import SETTINGS, STORE, rpc_call
from .framework import ANY, AUDIT_TARGET, OPS, RouteTable, json_response

__all__ = ["QUARANTINE", "HostDetail", "QuarantinedOut", "routes"]

routes = RouteTable()

QUARANTINE = web.AppKey("gateway.quarantine", QuarantineStore)
# What an agent accepts as a machine id (anything else cannot be one of its orphans).
_MACHINE_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$")


class QuarantinedOut(BaseModel):
    """A machine its host quarantined: stopped, its disk kept, until purged or retained out."""

    machine_id: str
    container_id: str | None = None
    was_running: bool = False
    quarantined_at: datetime | None = None
    purge_after: datetime | None = None
    cluster_id: str | None = None


class AlertOut(BaseModel):
    """A host's alert that is not cleared."""

    reason: str
    detail: str
    count: int
    at: datetime


class HostDetail(HostOut):
    """One host, with the orphans it quarantined and its alerts."""

    quarantined: list[QuarantinedOut] = Field(default_factory=list)
    alerts: list[AlertOut] = Field(default_factory=list)


class PurgeOut(BaseModel):
    """The answer of a purge."""

    host: str
    machine_id: str
    status: str


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
        min_disk=host.get("min_disk", XFS_MIN_DISK_BYTES),
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


async def _host(request: web.Request, host_id: str) -> tuple[HostView, dict[str, Any]]:
    """The host's view and document, or 404."""
    store, settings = request.app[STORE], request.app[SETTINGS]
    host = next((h for h in await store.list_hosts() if h["_id"] == host_id), None)
    if host is None:
        raise NotFoundError(f"no host {host_id}", reason="host_not_found")
    view = host_views([host], await store.allocations(host["dc"]), settings, utcnow())[0]
    return view, dict(host)


@routes.route(
    "GET",
    "/v1/hosts/{id}",
    roles=ANY,
    summary="Show a host",
    response=HostDetail,
    errors=(404,),
)
async def get_host(request: web.Request) -> web.Response:
    """One host, with the machines it quarantined (orphans kept, not deleted) and its alerts."""
    host_id = request.match_info["id"]
    view, host = await _host(request, host_id)
    reports = request.app[QUARANTINE]
    detail = HostDetail.model_validate(
        {
            **_host_out(view, host),
            "quarantined": await reports.quarantined(host_id),
            "alerts": await reports.alerts_of(host_id),
        }
    )
    return json_response(detail.model_dump(mode="json"))


@routes.route(
    "POST",
    "/v1/hosts/{id}/orphans/{machine_id}/purge",
    roles=OPS,
    summary="Purge a quarantined orphan",
    response=PurgeOut,
    errors=(404, 409, 503),
)
async def purge_orphan(request: web.Request) -> web.Response:
    """Ask the host's agent to delete a machine it quarantined: its container and its disk."""
    host_id, machine_id = request.match_info["id"], request.match_info["machine_id"]
    request[AUDIT_TARGET] = f"{host_id}/{machine_id}"
    await _host(request, host_id)
    if not _MACHINE_ID.match(machine_id):
        raise NotFoundError(f"host {host_id} holds no orphan {machine_id}", reason="not_found")
    timeout = timedelta(seconds=request.app[SETTINGS].rpc_timeout_s)
    cmd = provisioner.OrphanPurge(machine_id=machine_id, deadline=utcnow() + timeout)
    reply = await rpc_call(request, cmd, routing_key=host_key(host_id, cmd.TYPE))
    if isinstance(reply, provisioner.OrphanPurgeRefused):
        if reply.reason == "not_quarantined":
            raise NotFoundError(
                f"host {host_id} holds no quarantined machine {machine_id}",
                reason="orphan_not_found",
            )
        if reply.retriable:
            raise TransientError(f"purge of {machine_id} on {host_id} failed: {reply.reason}")
        raise ConflictError(f"purge of {machine_id} on {host_id} failed", reason=reply.reason)
    if not isinstance(reply, provisioner.ContainerDestroyed):
        raise TransientError(f"host {host_id} answered the purge with {reply.TYPE}")
    # The agent publishes container.destroyed too; writing it here shows it at once.
    await request.app[QUARANTINE].add_end(host_id, machine_id, "purged", utcnow())
    return json_response(PurgeOut(host=host_id, machine_id=machine_id, status="purged"))
