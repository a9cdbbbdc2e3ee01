"""How a route finds the app of the machine or release its path names, for a token's scope.

A route that names one by id declares one of these as its ``owner``; the route wrapper
(:mod:`.framework`) refuses a token scoped to other apps. A machine or release that does not
exist has no app: the handler's own 404 answers then.
"""

from __future__ import annotations

from aiohttp import web

from .deps import RELEASE_STORE, STORE

__all__ = ["machine_app", "release_app"]


async def machine_app(request: web.Request) -> str | None:
    """The app of the machine ``{id}``."""
    doc = await request.app[STORE].get(request.match_info["id"])
    return doc["app"] if doc is not None else None


async def release_app(request: web.Request) -> str | None:
    """The app of the release ``{release_id}``."""
    doc = await request.app[RELEASE_STORE].get(request.match_info["release_id"])
    return doc["app"] if doc is not None else None
