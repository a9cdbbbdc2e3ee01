"""The ``/v1/ips`` routes: who holds an IP and who held it, and its metrics history.

Ownership comes from the gateway's machines; the lease from ipam over RPC, and the metrics from
Prometheus (:mod:`.prometheus`), split by the owners ipam recorded.
"""

from __future__ import annotations

from datetime import timedelta
from ipaddress import IPv4Address

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from libs.common.clock import utcnow
from libs.common.contracts import ipam
from libs.common.contracts import monitor as mon
from libs.common.errors import TransientError

from ..domain.models import IpInfo, IpPath, IsoDatetime
from .deps import STORE, rpc_call
from .framework import ANY, FieldErrors, RouteTable, json_response
from .prometheus import ip_history
from .views import ipv4, machine_out

__all__ = ["MetricsQuery", "routes"]

routes = RouteTable()


class MetricsQuery(BaseModel):
    """``?from=&to=&step=`` of a metrics history (the last hour by default)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: IsoDatetime | None = Field(default=None, alias="from")
    to: IsoDatetime | None = None
    step: str = "1m"


@routes.route(
    "GET",
    "/v1/ips/{ip}",
    roles=ANY,
    summary="Owner and history of an IP",
    params=IpPath,
    response=IpInfo,
)
async def show_ip(request: web.Request) -> web.Response:
    """The machine holding the IP, every machine that held it, and ipam's lease."""
    ip = ipv4(request.match_info["ip"], "ip")
    docs = await request.app[STORE].machines_on_ip(ip)
    owner = next((d for d in reversed(docs) if d["state"] not in ("destroyed", "failed")), None)
    history = [
        {
            "machine_id": d["_id"],
            "app": d["app"],
            "state": d["state"],
            "from": d["created_at"],
            "until": d["updated_at"] if d["state"] == "destroyed" else None,
        }
        for d in docs
    ]
    try:
        info = await rpc_call(request, ipam.IpLookup(ip=IPv4Address(ip)))
        lease = info.model_dump(mode="json")
    except TransientError:
        lease = None
    return json_response(
        IpInfo(ip=ip, owner=machine_out(owner) if owner else None, history=history, lease=lease)
    )


@routes.route(
    "GET",
    "/v1/ips/{ip}/metrics",
    roles=ANY,
    summary="Metrics history of an IP",
    params=IpPath,
    query=MetricsQuery,
)
async def ip_metrics(request: web.Request, query: MetricsQuery) -> web.Response:
    """The IP's metrics over the window, from Prometheus, split by owner (ipam's history)."""
    ip = ipv4(request.match_info["ip"], "ip")
    to = query.to or utcnow()
    frm = query.from_ or to - timedelta(hours=1)
    try:
        q = mon.MetricsQuery(ip=IPv4Address(ip), from_=frm, to=to, step=query.step)
    except ValueError as err:
        raise FieldErrors.one("query", "invalid", str(err)) from err
    return await ip_history(request, ip, q.from_, q.to, q.step)
