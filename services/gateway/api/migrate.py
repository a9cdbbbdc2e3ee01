"""``POST /v1/machines/{id}/migrate``: cold migration of a machine to another host of its dc.

The checks that need nothing but the request's machine and the hosts run here, before anything
changes (404 unknown machine; 409 a machine busy or not running/stopped, a target that is down,
stale, drained or full; 422 a target that is unknown, the source itself or in another dc, one
entry for ``body.host``); the rest is the migrate saga (:mod:`..service.migrate`). Evacuating a
drained host is the CLI's loop over this route (``dockvm host evacuate``), one machine at a time
so that each placement sees where the previous one went.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from libs.common.errors import ConflictError, ValidationFailed

from .deps import DRIVER, SETTINGS, STORE
from .framework import AUDIT_TARGET, OPS, FieldErrors, RouteTable, json_response
from .scopes import machine_app
from .views import machine_links

__all__ = ["MigrateAccepted", "MigrateBody", "MigrateQuery", "routes"]

routes = RouteTable()


class MigrateBody(BaseModel):
    """Where to: a host of the machine's dc, or none for placement's choice."""

    model_config = ConfigDict(extra="forbid")
    host: str | None = Field(default=None, min_length=1, max_length=63)


class MigrateQuery(BaseModel):
    """``?wait=<seconds>``: answer once the migration ended (or the wait ran out)."""

    model_config = ConfigDict(extra="forbid")
    wait: float = Field(default=0, ge=0, le=3600)


class MigrateAccepted(BaseModel):
    """The answer to a migration: where from, where to, and the machine's state now."""

    id: str
    action: str = "migrate"
    state: str
    source: str
    target: str
    host: str | None = None
    links: dict[str, str]


@routes.route(
    "POST",
    "/v1/machines/{id}/migrate",
    roles=OPS,
    summary="Migrate a machine (cold) to another host",
    body=MigrateBody,
    query=MigrateQuery,
    response=MigrateAccepted,
    status=202,
    owner=machine_app,
    errors=(404, 409, 422),
)
async def migrate_machine(
    request: web.Request, body: MigrateBody, query: MigrateQuery
) -> web.Response:
    """Stop the machine, move its disk and identity to ``host`` and start it there (202); with
    ``wait``, 200 once moved, 409 if it went back to its source (the reason says why)."""
    driver, mid = request.app[DRIVER], request.match_info["id"]
    request[AUDIT_TARGET] = mid
    try:
        doc, op_id = await driver.migrations.begin(mid, body.host)
    except ValidationFailed as err:
        raise FieldErrors.one("body.host", err.reason, str(err)) from err
    params = doc["saga"]["params"]
    status = 202
    if query.wait:
        last = await driver.wait_op(mid, op_id, min(query.wait, request.app[SETTINGS].wait_max_s))
        if last is not None and not last.get("ok"):
            raise ConflictError(
                f"migration of {mid} to {params['target']} failed, the machine is back on "
                f"{params['source']}: {last.get('detail') or last.get('reason')}",
                reason="migrate_failed",
            )
        status = 200 if last is not None else 202
        doc = await request.app[STORE].get(mid) or doc
    out = MigrateAccepted(
        id=mid,
        state=doc["state"],
        source=params["source"],
        target=params["target"],
        host=doc.get("host"),
        links=machine_links(mid),
    )
    return json_response(out, status=status)
