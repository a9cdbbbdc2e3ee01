"""The ``/v1/hosts`` routes: each Docker host's liveness, capacity, images and what the gateway
placed; drain and undrain (placement skips a drained host); one host's quarantined orphans and
alerts, and the purge of a quarantined orphan (an RPC to the host's agent, which alone deletes:
the gateway only keeps what agents report)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

import structlog
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
from .framework import ANY, AUDIT_TARGET, OPS, WHO, RouteTable, json_response

__all__ = ["QUARANTINE", "DrainOut", "HostDetail", "QuarantinedOut", "routes"]

routes = RouteTable()
log = structlog.get_logger("gateway.hosts")

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


class DrainOut(BaseModel):
    """The answer of a drain or an undrain."""

    host: str
    drained: bool
    changed: bool


def _host_out(view: HostView, host: dict[str, Any], drained: bool = False) -> dict[str, Any]:
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
        drained=drained,
        images=sorted(host.get("images") or []),
    ).model_dump(mode="json")


@routes.route("GET", "/v1/hosts", roles=ANY, summary="List hosts", response=None)
async def list_hosts(request: web.Request) -> web.Response:
    """Every host, dc by dc, with its status from heartbeat age and its allocations."""
    store, settings = request.app[STORE], request.app[SETTINGS]
    hosts = await store.list_hosts()
    drained = await store.drains.drained()
    at = utcnow()
    out = []
    for dc in sorted({h["dc"] for h in hosts}):
        in_dc = [h for h in hosts if h["dc"] == dc]
        views = host_views(in_dc, await store.allocations(dc), settings, at, drained)
        out += [
            _host_out(view, h, h["_id"] in drained) for view, h in zip(views, in_dc, strict=True)
        ]
    return json_response({"items": out})


async def _host(request: web.Request, host_id: str) -> tuple[HostView, dict[str, Any]]:
    """The host's view and document (``drained`` in it), or 404."""
    store, settings = request.app[STORE], request.app[SETTINGS]
    host = next((h for h in await store.list_hosts() if h["_id"] == host_id), None)
    if host is None:
        raise NotFoundError(f"no host {host_id}", reason="host_not_found")
    drained = await store.drains.drained()
    allocated = await store.allocations(host["dc"])
    view = host_views([host], allocated, settings, utcnow(), drained)[0]
    return view, {**host, "drained": host_id in drained}


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
            **_host_out(view, host, host["drained"]),
            "quarantined": await reports.quarantined(host_id),
            "alerts": await reports.alerts_of(host_id),
        }
    )
    return json_response(detail.model_dump(mode="json"))


async def _set_drain(request: web.Request, drain: bool) -> web.Response:
    """Drain or undrain the host (404 unknown host); idempotent, ``changed`` says if it was."""
    host_id = request.match_info["id"]
    request[AUDIT_TARGET] = host_id
    await _host(request, host_id)
    drains = request.app[STORE].drains
    if drain:
        changed = await drains.drain(host_id, request[WHO].name, utcnow())
    else:
        changed = await drains.undrain(host_id)
    if changed:
        log.warning("host drained" if drain else "host undrained", host=host_id)
    return json_response(DrainOut(host=host_id, drained=drain, changed=changed))


@routes.route(
    "POST",
    "/v1/hosts/{id}/drain",
    roles=OPS,
    summary="Drain a host: place nothing new there",
    response=DrainOut,
    errors=(404,),
)
async def drain_host(request: web.Request) -> web.Response:
    """Stop placing machines on the host; those it holds stay where they are."""
    return await _set_drain(request, True)


@routes.route(
    "POST",
    "/v1/hosts/{id}/undrain",
    roles=OPS,
    summary="Undrain a host: place machines there again",
    response=DrainOut,
    errors=(404,),
)
async def undrain_host(request: web.Request) -> web.Response:
    """Place machines on the host again."""
    return await _set_drain(request, False)


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
