"""The ``/v1/audit`` route: who did what through the API (written by the route wrapper)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from ..domain.models import AuditPage
from .deps import STORE
from .framework import OPS, RouteTable, json_response

__all__ = ["AuditQuery", "routes"]

routes = RouteTable()


class AuditQuery(BaseModel):
    """``?limit=&who=`` of the audit log."""

    model_config = ConfigDict(extra="forbid")
    limit: int = Field(default=100, ge=1, le=1000)
    who: str | None = None


@routes.route(
    "GET",
    "/v1/audit",
    roles=OPS,
    summary="Read the audit log",
    query=AuditQuery,
    response=AuditPage,
)
async def audit(request: web.Request, query: AuditQuery) -> web.Response:
    """The newest audit entries, optionally of one caller."""
    docs = await request.app[STORE].audit_list(query.limit, query.who)
    return json_response(AuditPage(items=docs))  # type: ignore[arg-type]
