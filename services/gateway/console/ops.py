"""The console's other pages: hosts (drain/undrain), releases (rollback), images with builds
and sync jobs, bastion sessions (replay, end) and the audit log. Every read and action is a
``/v1`` call with the browser's token."""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import quote

from aiohttp import web

from ..api.releases import ReleaseCreate
from ..domain.rollout import ReleaseStatus
from .frame import (
    V1_CLIENT,
    api,
    caller,
    form_action,
    page,
    refused,
    render,
    reply_or_refused,
)

__all__ = ["routes"]

routes = web.RouteTableDef()


@routes.get("/ui/hosts")
@page
async def hosts(request: web.Request) -> web.StreamResponse:
    """Every host: capacity, allocation, state."""
    reply = await api(request, "GET", "/v1/hosts")
    if not reply.ok:
        return refused(request, reply.status, reply.detail)
    return render(request, "hosts.html", items=reply.body["items"])


@routes.post("/ui/hosts/{id}/{op:drain|undrain}")
@form_action
async def host_drain(request: web.Request) -> web.StreamResponse:
    """Drain or undrain a host through the API."""
    hid, op = request.match_info["id"], request.match_info["op"]
    reply = await api(request, "POST", f"/v1/hosts/{quote(hid)}/{op}")
    return reply_or_refused(request, reply, "/ui/hosts", f"{op} {hid} requested")


@routes.get("/ui/releases")
@page
async def releases(request: web.Request) -> web.StreamResponse:
    """Releases, newest first, with their batches as they move."""
    params = {"app": request.query["app"]} if request.query.get("app") else None
    reply = await api(request, "GET", "/v1/releases", params=params)
    if not reply.ok:
        return refused(request, reply.status, reply.detail)
    items = reply.body["items"]
    return render(request, "releases.html", items=items, previous=_previous_versions(items))


def _previous_versions(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each release, the app's newest older release that succeeded with another version:
    what its rollback deploys."""
    out: dict[str, dict[str, Any]] = {}
    for i, rel in enumerate(items):
        for older in items[i + 1 :]:
            same_app = older["app"] == rel["app"]
            done = older["status"] == ReleaseStatus.SUCCEEDED
            if same_app and done and older["version"] != rel["version"]:
                out[rel["id"]] = older
                break
    return out


@routes.post("/ui/releases/{id}/rollback")
@form_action
async def rollback(request: web.Request) -> web.StreamResponse:
    """Deploy the previous version again: a new release with the older release's spec."""
    rid = request.match_info["id"]
    reply = await api(request, "GET", "/v1/releases")
    if not reply.ok:
        return refused(request, reply.status, reply.detail, "/ui/releases")
    older = _previous_versions(reply.body["items"]).get(rid)
    if older is None:
        return refused(request, 409, f"release {rid} has no earlier version to go back to",
                       "/ui/releases")  # fmt: skip
    spec = {k: v for k, v in older["spec"].items() if k in ReleaseCreate.model_fields}
    spec.pop("release_id", None)
    created = await api(request, "POST", "/v1/releases", body=spec)
    return reply_or_refused(
        request, created, "/ui/releases", f"rollback of {older['app']} to {older['version']}"
    )


@routes.get("/ui/images")
@page
async def images(request: web.Request) -> web.StreamResponse:
    """What each registry holds, platform-built images, builds and replication jobs."""
    prefix = request.query.get("prefix", "").strip()
    held_query = {"limit": "200", **({"prefix": prefix} if prefix else {})}
    held, imgs, builds, jobs = await asyncio.gather(
        api(request, "GET", "/v1/registries", params=held_query),
        api(request, "GET", "/v1/images"),
        api(request, "GET", "/v1/images/builds", params={"limit": "50"}),
        api(request, "GET", "/v1/images/sync-jobs", params={"limit": "50"}),
    )
    return render(
        request, "images.html", prefix=prefix,
        registries=held.body["registries"] if held.ok else None,
        registries_error=None if held.ok else held.detail,
        images=imgs.body if imgs.ok else None, images_error=None if imgs.ok else imgs.detail,
        builds=builds.body if builds.ok else None,
        builds_error=None if builds.ok else builds.detail,
        jobs=jobs.body if jobs.ok else None, jobs_error=None if jobs.ok else jobs.detail,
    )  # fmt: skip


@routes.get("/ui/images/builds/{id}")
@page
async def build_log(request: web.Request) -> web.StreamResponse:
    """One build and its log."""
    bid = quote(request.match_info["id"])
    build, log = await asyncio.gather(
        api(request, "GET", f"/v1/images/builds/{bid}"),
        api(request, "GET", f"/v1/images/builds/{bid}/log", params={"follow": "false"}),
    )
    if not build.ok:
        return refused(request, build.status, build.detail, "/ui/images")
    return render(request, "build.html", build=build.body, log=log.body if log.ok else log.detail)


@routes.get("/ui/sessions")
@page
async def sessions(request: web.Request) -> web.StreamResponse:
    """The bastion's sessions (live ones first)."""
    params = {k: request.query[k] for k in ("user", "ip") if request.query.get(k)}
    reply = await api(request, "GET", "/v1/sessions", params=params)
    if not reply.ok:
        return refused(request, reply.status, reply.detail)
    items = sorted(reply.body["items"], key=lambda s: (not s["live"], s["started_at"]))
    return render(request, "sessions.html", items=items, filters=params)


@routes.get("/ui/sessions/{id}")
@page
async def session_page(request: web.Request) -> web.StreamResponse:
    """One session, its recording replayed in the page by asciinema-player."""
    sid = quote(request.match_info["id"])
    reply = await api(request, "GET", f"/v1/sessions/{sid}")
    if not reply.ok:
        return refused(request, reply.status, reply.detail, "/ui/sessions")
    return render(request, "session.html", s=reply.body)


@routes.get("/ui/sessions/{id}/recording.cast")
@page
async def recording(request: web.Request) -> web.StreamResponse:
    """The session's asciicast from the API, for the player (same origin, same cookie)."""
    sid = quote(request.match_info["id"])
    token = caller(request).session.token
    status, data, ctype = await request.app[V1_CLIENT].raw(token, f"/v1/sessions/{sid}/recording")
    return web.Response(status=status, body=data, content_type=ctype or "text/plain")


@routes.post("/ui/sessions/{id}/end")
@form_action
async def end_session(request: web.Request) -> web.StreamResponse:
    """End a live session through the API."""
    sid = request.match_info["id"]
    reply = await api(request, "DELETE", f"/v1/sessions/{quote(sid)}")
    return reply_or_refused(request, reply, f"/ui/sessions/{quote(sid)}", "end requested")


@routes.get("/ui/audit")
@page
async def audit(request: web.Request) -> web.StreamResponse:
    """The audit log, filterable by who acted."""
    params = {"limit": "200"}
    if request.query.get("who"):
        params["who"] = request.query["who"]
    reply = await api(request, "GET", "/v1/audit", params=params)
    if not reply.ok:
        return refused(request, reply.status, reply.detail)
    text = (request.query.get("q") or "").lower()
    items = [e for e in reply.body["items"] if not text or text in str(e).lower()]
    return render(request, "audit.html", items=items, who_filter=params.get("who", ""), q=text)
