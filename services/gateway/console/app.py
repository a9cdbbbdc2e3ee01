"""Mounting the console at ``/ui/`` on the gateway's HTTP app: templates, static files
(``static/vendor`` is filled from npm by scripts/web.sh) and the ``/v1`` client."""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from . import ops, pages
from .frame import V1_CLIENT
from .v1 import V1
from .views import human_bytes

__all__ = ["STATIC", "mount_console"]

HERE = Path(__file__).parent
# The browser keeps the console's scripts and styles this long without asking again (a new
# release of them comes with `make run`, and a reload after an upgrade is no hardship).
STATIC_MAX_AGE_S = 3600
STATIC = HERE / "static"


def mount_console(app: web.Application, api_base: str) -> None:
    """Add the console's pages and static files to ``app``; it calls ``/v1`` at ``api_base``."""
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True),
    )
    env.filters["bytes"] = human_bytes
    client = V1(api_base)
    app[V1_CLIENT] = client

    async def start(_: web.Application) -> None:
        await client.start()

    async def stop(_: web.Application) -> None:
        await client.close()

    app.on_startup.append(start)
    app.on_response_prepare.append(_headers)
    app.on_cleanup.append(stop)
    app.router.add_routes(pages.routes)
    app.router.add_routes(ops.routes)
    app.router.add_static("/ui/static", STATIC, append_version=True)


# No page of the console may be framed by another site (clickjacking), nor take plugins or
# another base URL; its pages are never cached (they hold a CSRF token and live data).
_PAGE_HEADERS = {
    "Content-Security-Policy": "frame-ancestors 'none'; object-src 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    """The console's security headers; its static files cacheable, its pages not."""
    if not request.path.startswith("/ui"):
        return
    response.headers.update(_PAGE_HEADERS)
    if request.path.startswith("/ui/static/") and response.status == 200:
        response.headers["Cache-Control"] = f"public, max-age={STATIC_MAX_AGE_S}"
    else:
        response.headers["Cache-Control"] = "no-store"
