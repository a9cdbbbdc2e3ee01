"""The console's login and machine pages: the list, a machine with its transitions, IP
history, plot and actions, and an IP's own page. Every read and action is a ``/v1`` call."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import quote, urlencode

from aiohttp import web

from libs.common.clock import utcnow

from .frame import V1_CLIENT, api, caller, form_action, page, refused, render, reply_or_refused
from .session import (
    COOKIE,
    CSRF_FIELD,
    LOGIN_COOKIE,
    cookie_options,
    login_nonce,
    new_session,
)
from .views import RANGES, STATES, owner_marks, parse_time, plot_columns, window

__all__ = ["routes"]

routes = web.RouteTableDef()
FILTERS = ("app", "state", "host", "ip")
ACTIONS = ("start", "stop", "restart")
PAGE_SIZE = 25
# The provisioner's refusals a forced resize overrides (a memory limit below what is in use).
SCALE_DOWN = frozenset({"memory_below_usage"})


def _secure(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto") == "https"


def _next(value: str | None) -> str:
    """Only a console path: a login never sends the browser elsewhere."""
    return value if value and value.startswith("/ui/") and not value.startswith("//") else "/ui/"


@routes.get("/ui")
@routes.get("/ui/")
async def home(request: web.Request) -> web.StreamResponse:
    """The console starts at the machine list."""
    raise web.HTTPSeeOther("/ui/machines")


@routes.get("/ui/login")
async def login_form(request: web.Request) -> web.StreamResponse:
    """The login form, with a fresh double-submit nonce."""
    nonce = login_nonce()
    resp = render(
        request, "login.html", nonce=nonce, next=_next(request.query.get("next")),
        error=request.query.get("error"),
    )  # fmt: skip
    resp.set_cookie(LOGIN_COOKIE, nonce, **cookie_options(secure=_secure(request), max_age=900))
    return resp


@routes.post("/ui/login")
async def login(request: web.Request) -> web.StreamResponse:
    """Check the token against the API and keep it in the session cookie."""
    form = await request.post()
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or form.get(CSRF_FIELD) != nonce:
        detail = "The login form's CSRF token is missing or stale."
        return refused(request, 403, detail, "/ui/login")
    token = str(form.get("token") or "").strip()
    target = _next(str(form.get("next") or ""))
    probe = None
    if token:
        # Any role may list machines: the cheapest proof that the API takes this token.
        probe = await request.app[V1_CLIENT].call(
            token, "GET", "/v1/machines", params={"limit": "1"}
        )
    if probe is None or probe.status == 401:
        raise web.HTTPSeeOther("/ui/login?" + urlencode({"error": "That token is not valid."}))
    session = new_session(token)
    resp = web.HTTPSeeOther(target)
    resp.set_cookie(COOKIE, session.cookie, **cookie_options(secure=_secure(request)))
    resp.del_cookie(LOGIN_COOKIE, path="/ui")
    raise resp


@routes.post("/ui/logout")
@form_action
async def logout(request: web.Request) -> web.StreamResponse:
    """Forget the session cookie."""
    resp = web.HTTPSeeOther("/ui/login")
    resp.del_cookie(COOKIE, path="/ui")
    raise resp


@routes.get("/ui/machines")
@page
async def machines(request: web.Request) -> web.StreamResponse:
    """Machines filtered by app, state, host and IP, a page at a time."""
    filters = {k: request.query[k] for k in FILTERS if request.query.get(k)}
    size = request.query.get("limit", "")
    if size.isdigit() and 1 <= int(size) <= 500:
        filters["limit"] = size
    params = {"limit": str(PAGE_SIZE), **filters}
    if request.query.get("after"):
        params["after"] = request.query["after"]
    reply = await api(request, "GET", "/v1/machines", params=params)
    if not reply.ok:
        return refused(request, reply.status, reply.detail, "/ui/machines")
    items = reply.body["items"]
    after = reply.body.get("next")
    more = "/ui/machines?" + urlencode({**filters, "after": after}) if after else None
    first = "/ui/machines?" + urlencode(filters) if request.query.get("after") else None
    return render(
        request, "machines.html", items=items, filters=filters, states=STATES, more=more,
        first=first,
    )  # fmt: skip


@routes.get("/ui/machines/{id}")
@page
async def machine(request: web.Request) -> web.StreamResponse:
    """A machine: state, transitions, resources, IP history, plot and actions."""
    mid = request.match_info["id"]
    reply = await api(request, "GET", f"/v1/machines/{quote(mid)}")
    if not reply.ok:
        return refused(request, reply.status, reply.detail, "/ui/machines")
    m = reply.body
    ctx: dict[str, Any] = {"m": m, "ip_info": None, "plot": None, "hosts": []}
    if m.get("ip"):
        ctx.update(await _ip_context(request, m["ip"], m.get("cpus")))
    if caller(request).can_act:
        hosts = await api(request, "GET", "/v1/hosts")
        if hosts.ok:
            ctx["hosts"] = [h["id"] for h in hosts.body["items"] if h.get("dc") == m.get("dc")]
    return render(request, "machine.html", **ctx)


async def _ip_context(request: web.Request, ip: str, cpus: float | None) -> dict[str, Any]:
    """The IP's owners and its metrics plot over the chosen range (both asked at once)."""
    rng, query = window(request.query.get("range", "1h"), utcnow())
    info, metrics = await asyncio.gather(
        api(request, "GET", f"/v1/ips/{ip}"),
        api(request, "GET", f"/v1/ips/{ip}/metrics", params=query),
    )
    plot: dict[str, Any] = {"range": rng.name, "ranges": list(RANGES), "error": None}
    if metrics.ok:
        body = metrics.body
        start, end = parse_time(body["from"]) or utcnow(), parse_time(body["to"]) or utcnow()
        data = {
            "columns": plot_columns(body["points"], rng.step_s, cpus),
            "owners": owner_marks(body.get("owners") or [], start, end),
            "from": start.timestamp(),
            "to": end.timestamp(),
            "range": rng.name,
        }
        # Inside a <script> element: no "</script>" may appear, so no "<" at all.
        plot["data"] = json.dumps(data).replace("<", "\\u003c")
        plot["points"] = len(body["points"])
    else:
        plot["error"] = metrics.detail
    return {"ip_info": info.body if info.ok else None, "plot": plot, "ip": ip}


@routes.get("/ui/ips/{ip}")
@page
async def ip_page(request: web.Request) -> web.StreamResponse:
    """An IP: who held it, and its metrics with each holder marked."""
    ip = request.match_info["ip"]
    return render(request, "ip.html", **await _ip_context(request, ip, None))


@routes.post("/ui/machines/{id}/action")
@form_action
async def machine_action(request: web.Request) -> web.StreamResponse:
    """Start, stop, restart or delete, through the API."""
    mid = request.match_info["id"]
    form = await request.post()
    action = str(form.get("action") or "")
    back = f"/ui/machines/{quote(mid)}"
    if action == "delete":
        reply = await api(request, "DELETE", f"/v1/machines/{quote(mid)}")
    elif action in ACTIONS:
        reply = await api(request, "POST", f"/v1/machines/{quote(mid)}/{action}")
    else:
        return refused(request, 422, f"unknown action {action!r}", back)
    return reply_or_refused(request, reply, back, f"{action} requested")


@routes.post("/ui/machines/{id}/resize")
@form_action
async def machine_resize(request: web.Request) -> web.StreamResponse:
    """Resize through the API (which warns of a scale-down unless forced)."""
    mid = request.match_info["id"]
    form = await request.post()
    body: dict[str, Any] = {
        k: str(form[k]).strip() for k in ("memory", "disk") if str(form.get(k) or "").strip()
    }
    if str(form.get("cpus") or "").strip():
        try:
            body["cpus"] = float(str(form["cpus"]))
        except ValueError:
            return refused(request, 422, "cpus must be a number", f"/ui/machines/{quote(mid)}")
    body["force"] = form.get("force") == "on"
    reply = await api(request, "PATCH", f"/v1/machines/{quote(mid)}", body=body)
    back = f"/ui/machines/{quote(mid)}"
    if not reply.ok and isinstance(reply.body, dict) and reply.body.get("reason") in SCALE_DOWN:
        # The API's scale-down warning, with the same resize offered again, forced.
        retry = {k: str(v) for k, v in body.items() if k != "force"} | {"force": "on"}
        return render(
            request, "error.html", status=reply.status, status_code=reply.status,
            detail=reply.detail, back=back, retry={"action": request.path, "fields": retry},
            heading="Scale-down warning",
        )  # fmt: skip
    return reply_or_refused(request, reply, back, "resized")


@routes.post("/ui/machines/{id}/migrate")
@form_action
async def machine_migrate(request: web.Request) -> web.StreamResponse:
    """Migrate to a host (or wherever placement says) through the API."""
    mid = request.match_info["id"]
    form = await request.post()
    host = str(form.get("host") or "").strip()
    body = {"host": host} if host else {}
    reply = await api(request, "POST", f"/v1/machines/{quote(mid)}/migrate", body=body)
    return reply_or_refused(request, reply, f"/ui/machines/{quote(mid)}", "migration requested")
