"""The gateway's side of Prometheus: service discovery, the alert receiver, and the metrics
history of an IP read back from Prometheus.

- ``GET /v1/prometheus/targets``: Prometheus HTTP service discovery (``http_sd_config``): every
  service's and host agent's ``/metrics`` and every running machine's node exporter, labelled
  ``dc``, ``host``, ``app``, ``ip``, ``machine_id``; a new host or machine is scraped at the next
  refresh, without touching Prometheus's configuration.
- ``POST /v1/prometheus/alerts``: Alertmanager's webhook; each alert (firing or resolved) becomes
  one audit entry (``GET /v1/audit``), written once per (alert, state, start) whatever
  Alertmanager's retries.

Both are outside the token/role frame: they take one credential, the bearer in
``DOCKVM_PROMETHEUS_SECRET_FILE`` (0600, written by scripts/stack.sh, given to Prometheus and
Alertmanager as ``credentials_file``), which can do these two things and nothing else. The
file is read per request, so replacing it takes effect without a restart.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from datetime import datetime
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import to_json

from libs.common.clock import utcnow
from libs.common.contracts import ipam
from libs.common.errors import ConflictError, TransientError

from ..domain.metrics import OwnerWindow, owner_windows, split_by_owner, step_seconds
from ..service.prometheus import PrometheusClient
from .deps import SETTINGS, STORE, rpc_call

__all__ = [
    "OWNERS",
    "PROMETHEUS",
    "OwnerCache",
    "add_prometheus_routes",
    "ip_history",
    "sd_targets",
]

log = structlog.get_logger("gateway.prometheus")

PROMETHEUS = web.AppKey("gateway.prometheus_client", PrometheusClient)
_WHO = "alertmanager"


def _parse_addrs(spec: str) -> dict[str, str]:
    """``name=addr,name=addr`` as a dict (blank entries ignored)."""
    out = {}
    for part in spec.split(","):
        name, _, addr = part.strip().partition("=")
        if name and addr:
            out[name.strip()] = addr.strip()
    return out


def sd_targets(
    hosts: list[dict[str, Any]],
    machines: list[dict[str, Any]],
    *,
    services: str,
    agent_ports: str,
    node_port: int,
) -> list[dict[str, Any]]:
    """The http_sd target groups: services, each host's agents, each running machine."""
    groups: list[dict[str, Any]] = []
    for app, addr in _parse_addrs(services).items():
        groups.append({"targets": [addr], "labels": {"app": app}})
    ports = _parse_addrs(agent_ports)
    for h in hosts:
        labels = h.get("labels") or {}
        for app, port in ports.items():
            # An agent elsewhere than the host's address names itself: dockvm.metrics.<app>.
            default = f"{labels.get('dockvm.addr', '127.0.0.1')}:{port}"
            addr = labels.get(f"dockvm.metrics.{app}") or default
            groups.append(
                {"targets": [addr], "labels": {"dc": h["dc"], "host": h["_id"], "app": app}}
            )
    for m in machines:
        if not m.get("ip"):
            continue
        labels = {
            "dc": m.get("dc") or "",
            "host": m.get("host") or "",
            "app": m.get("app") or "",
            "ip": m["ip"],
            "machine_id": m["_id"],
        }
        groups.append({"targets": [f"{m['ip']}:{node_port}"], "labels": labels})
    return groups


def _authorized(request: web.Request) -> None:
    """Refuse (401) anything but the monitoring credential."""
    path: Path = request.app[SETTINGS].prometheus_secret_path()
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    try:
        secret = path.read_text().strip()
    except OSError:
        secret = ""
    if not secret or scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), secret):
        raise web.HTTPUnauthorized(
            text="the monitoring credential is required (Authorization: Bearer <secret file>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def targets(request: web.Request) -> web.Response:
    """Prometheus HTTP service discovery of everything dockvm runs."""
    _authorized(request)
    settings, store = request.app[SETTINGS], request.app[STORE]
    hosts = await store.list_hosts()
    index = store.index
    if index is not None and index.ready:
        machines = index.page({"state": "running"}, 1_000_000, None)
    else:
        machines = await store.find({"state": "running"}, 1_000_000)
    groups = sd_targets(
        hosts,  # type: ignore[arg-type]
        machines,  # type: ignore[arg-type]
        services=settings.prometheus_services,
        agent_ports=settings.prometheus_agent_ports,
        node_port=settings.node_exporter_port,
    )
    return web.json_response(groups)


class _Alert(BaseModel):
    model_config = ConfigDict(extra="ignore")
    status: str
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    # Alertmanager's field names.
    startsAt: datetime
    endsAt: datetime | None = None
    fingerprint: str = ""


class _Notification(BaseModel):
    model_config = ConfigDict(extra="ignore")
    alerts: list[_Alert]


async def alerts(request: web.Request) -> web.Response:
    """Alertmanager's webhook: one audit entry per alert and state."""
    _authorized(request)
    try:
        note = _Notification.model_validate(await request.json())
    except (ValueError, ValidationError) as err:
        raise web.HTTPBadRequest(text=f"not an Alertmanager notification: {err}") from err
    store = request.app[STORE]
    written = 0
    for a in note.alerts:
        labels = a.labels
        entry = {
            "_id": f"alert:{a.fingerprint or labels.get('alertname')}:{a.status}:"
            f"{a.startsAt.isoformat()}",
            "at": utcnow(),
            "who": _WHO,
            "role": "monitoring",
            "method": request.method,
            "path": request.path,
            "status": 200,
            "target": labels.get("machine_id") or labels.get("host") or labels.get("instance"),
            "event": f"alert.{a.status}",
            "detail": {
                "alert": labels.get("alertname", ""),
                "labels": labels,
                "summary": a.annotations.get("summary", ""),
                "starts_at": a.startsAt,
                "ends_at": a.endsAt if a.status == "resolved" else None,
            },
        }
        try:
            await store.audit_write(entry)
            written += 1
        except ConflictError:  # Alertmanager sent it again: written already
            pass
    log.info("alerts received", alerts=len(note.alerts), written=written)
    return web.json_response({"received": len(note.alerts), "written": written})


class OwnerCache:
    """ipam's ownership windows per IP, kept ``ttl_s``: a history read is then one Prometheus
    round trip, not that and an RPC whose FerretDB reads were the slower half. A point of a
    machine the cached windows do not name (a new owner) reads ipam again at once, so a
    change of owner is never hidden; only a release's end time may lag by ``ttl_s``."""

    def __init__(self, ttl_s: float = 10.0, size: int = 4096) -> None:
        self._ttl, self._size = ttl_s, size
        self._items: dict[str, tuple[float, list[OwnerWindow]]] = {}

    def get(self, ip: str) -> list[OwnerWindow] | None:
        """The fresh windows of ``ip``, or None."""
        hit = self._items.get(ip)
        if hit is None or time.monotonic() - hit[0] > self._ttl:
            return None
        return hit[1]

    def put(self, ip: str, windows: list[OwnerWindow]) -> None:
        """Remember ``ip``'s windows (the oldest entry goes when full)."""
        if len(self._items) >= self._size:
            self._items.pop(next(iter(self._items)))
        self._items[ip] = (time.monotonic(), windows)


OWNERS = web.AppKey("gateway.ip_owners", OwnerCache)


async def _windows(request: web.Request, ip: str) -> list[OwnerWindow] | None:
    """The IP's ownership windows from ipam (None: ipam did not answer), cached."""
    try:
        info = await rpc_call(request, ipam.IpLookup(ip=IPv4Address(ip)))
    except TransientError:
        return None  # ipam down: the points as measured, each with its machine
    windows = owner_windows([h.model_dump() for h in info.history])  # type: ignore[attr-defined]
    request.app[OWNERS].put(ip, windows)
    return windows


async def ip_history(
    request: web.Request, ip: str, start: datetime, end: datetime, step: str
) -> web.Response:
    """The IP's history from Prometheus, split by the owners ipam recorded (asked at once, or
    cached), as :class:`MetricsQueryResult`'s JSON."""
    step_s = step_seconds(step)
    read = request.app[PROMETHEUS].ip_history(ip, start, end, step_s)
    cached = request.app[OWNERS].get(ip)
    windows: list[OwnerWindow] | None
    if cached is None:
        windows, points = await asyncio.gather(_windows(request, ip), read)
    else:
        windows, points = cached, await read
        named = {w.machine_id for w in windows}
        # A machine ipam's cached history does not name: a new owner, read ipam again. (No
        # history at all: the IP was never leased, the points stay as measured.)
        if named and any(p["machine_id"] not in named for p in points):
            windows = await _windows(request, ip)
    kept, owners = split_by_owner(points, windows, start, end, step_s)
    body = {
        "ip": ip,
        "from": start,
        "to": end,
        "step": step,
        "points": kept,
        "owners": [o.model_dump(mode="json", by_alias=True) for o in owners],
    }
    # pydantic's serializer writes datetimes as the models do (…Z), many times json's speed.
    return web.Response(body=to_json(body), content_type="application/json")


def add_prometheus_routes(app: web.Application, client: PrometheusClient) -> None:
    """Mount the discovery and alert routes and provide the Prometheus client."""
    app[PROMETHEUS] = client
    app[OWNERS] = OwnerCache()
    app.router.add_get("/v1/prometheus/targets", targets)
    app.router.add_post("/v1/prometheus/alerts", alerts)
