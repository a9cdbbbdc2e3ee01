"""The frame every console page and form goes through: the session from the cookie, the
caller's role (to hide buttons it could not use), rendering, and the CSRF check of a form.

The role only decides what is shown; what may be done is decided by the API, which the
console calls with the same token (:mod:`.v1`). A form without this session's CSRF token is
refused (403) before anything reaches the API.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
from aiohttp import web

from ..api.deps import STORE
from .session import COOKIE, CSRF_FIELD, Session, csrf_valid, parse_session
from .v1 import V1, Reply

__all__ = [
    "ACTORS",
    "V1_CLIENT",
    "Caller",
    "Page",
    "api",
    "caller",
    "done",
    "form_action",
    "page",
    "refused",
    "render",
    "reply_or_refused",
]

V1_CLIENT = web.AppKey("gateway.console_v1", V1)
CALLER = web.RequestKey("gateway.console_caller", object)
# Roles shown action buttons (the API's OPS routes); a viewer sees none.
ACTORS = frozenset({"admin", "ops"})

Page = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Caller:
    """The logged-in browser: its session, token name and role."""

    def __init__(self, session: Session, name: str, role: str) -> None:
        self.session = session
        self.name = name
        self.role = role

    @property
    def can_act(self) -> bool:
        """Whether to show action buttons (the API decides whether they work)."""
        return self.role in ACTORS

    @property
    def is_admin(self) -> bool:
        """Whether to show admin-only buttons."""
        return self.role == "admin"


def caller(request: web.Request) -> Caller:
    """The caller :func:`page` or :func:`form_action` found."""
    found = request.get(CALLER)
    if not isinstance(found, Caller):
        raise web.HTTPSeeOther("/ui/login")
    return found


async def _load(request: web.Request) -> Caller | None:
    session = parse_session(request.cookies.get(COOKIE))
    if session is None:
        return None
    doc = await request.app[STORE].token_by_secret(session.token)
    if doc is None:
        return None
    return Caller(session, doc["name"], doc["role"])


def _to_login(request: web.Request) -> web.HTTPSeeOther:
    return web.HTTPSeeOther("/ui/login?" + urlencode({"next": request.path_qs}))


def page(fn: Page) -> Page:
    """A page for logged-in callers; others are sent to the login page."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        found = await _load(request)
        if found is None:
            raise _to_login(request)
        request[CALLER] = found
        return await fn(request)

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


def form_action(fn: Page) -> Page:
    """A POSTed form: refused (403) without the session's CSRF token, else ``fn``."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        found = await _load(request)
        form = await request.post()
        if found is None:
            return refused(request, 401, "Your session has ended: log in again.")
        if not csrf_valid(found.session, str(form.get(CSRF_FIELD) or "")):
            return refused(request, 403, "The form's CSRF token is missing or not this session's.")
        request[CALLER] = found
        return await fn(request)

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


async def api(
    request: web.Request,
    method: str,
    path: str,
    *,
    params: dict[str, str] | None = None,
    body: Any = None,
) -> Reply:
    """``method path`` on the ``/v1`` API with the caller's token."""
    token = caller(request).session.token
    return await request.app[V1_CLIENT].call(token, method, path, params=params, body=body)


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    """A page from ``template`` with the caller, its CSRF token and ``ctx``."""
    who = request.get(CALLER)
    base = {
        "request": request,
        "who": who,
        "csrf": who.session.csrf if isinstance(who, Caller) else "",
        "path": request.path,
        "msg": request.query.get("msg"),
    }
    return aiohttp_jinja2.render_template(template, request, {**base, **ctx}, status=status)


def refused(
    request: web.Request, status: int, detail: str, back: str | None = None
) -> web.Response:
    """The error page for an action the API or the frame refused, with the API's status."""
    return render(
        request, "error.html", status=status, status_code=status, detail=detail,
        back=back if back and back.startswith("/ui/") else "/ui/",
    )  # fmt: skip


def done(to: str, msg: str) -> web.HTTPSeeOther:
    """Back to ``to`` after an action, its outcome in the page's message."""
    sep = "&" if "?" in to else "?"
    return web.HTTPSeeOther(f"{to}{sep}{urlencode({'msg': msg})}")


def reply_or_refused(request: web.Request, reply: Reply, back: str, msg: str) -> web.Response:
    """A successful action goes back to ``back``; a refused one shows the API's answer."""
    if reply.ok:
        raise done(back, msg)
    return refused(request, reply.status, reply.detail, back)
