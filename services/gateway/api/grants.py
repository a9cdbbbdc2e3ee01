"""The ``/v1/grants`` routes: who may log in where through the bastion, for how long. Grants
belong to the bastion, so each route is one RPC to it (:mod:`.bastion_rpc`).

Roles: ops grant and revoke (an admin too). A token scoped to some apps may grant only on those
apps, or on a machine of one of them.
"""

from __future__ import annotations

import json

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from libs.common.contracts import bastion

from ..domain.models import APP_RE
from .bastion_rpc import ask_bastion
from .deps import STORE
from .framework import AUDIT_TARGET, OPS, RouteTable, json_response
from .users import USER_NAME_RE

__all__ = ["GrantCreateBody", "GrantPage", "GrantPath", "GrantQuery", "routes"]

routes = RouteTable()

_MAX_TTL_S = 366 * 24 * 3600


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GrantCreateBody(_Request):
    """``POST /v1/grants``: let ``user`` log in as ``login`` on one machine, or on every machine
    of an app (also ones created later), for ``ttl_s`` seconds; ``record_input`` records her
    keystrokes too. A given ``id`` makes the request idempotent."""

    id: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    user: str = Field(pattern=USER_NAME_RE)
    app: str | None = Field(default=None, pattern=APP_RE)
    machine_id: str | None = Field(default=None, min_length=1, max_length=64)
    login: str = Field(default="root", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    ttl_s: int = Field(ge=1, le=_MAX_TTL_S)
    record_input: bool = False

    @model_validator(mode="after")
    def _app_or_machine(self) -> GrantCreateBody:
        if (self.app is None) == (self.machine_id is None):
            raise ValueError("give exactly one of app and machine_id")
        return self


class GrantQuery(_Request):
    """``?user=&include_expired=`` of the grant listing."""

    user: str | None = Field(default=None, pattern=USER_NAME_RE)
    include_expired: bool = False


class GrantPath(_Request):
    """``{id}``: a grant."""

    id: str = Field(min_length=1, max_length=64)


class GrantPage(BaseModel):
    """Grants."""

    items: list[bastion.GrantInfo]


async def _granted_machine_app(request: web.Request) -> str | None:
    """The app of the machine a grant names, for a scoped token (the body is read already)."""
    try:
        machine_id = json.loads(await request.read() or b"{}").get("machine_id")
    except (ValueError, AttributeError):
        return None
    if not isinstance(machine_id, str):
        return None
    doc = await request.app[STORE].get(machine_id)
    return doc["app"] if doc is not None else None


@routes.route(
    "POST",
    "/v1/grants",
    roles=OPS,
    summary="Grant a user SSH access through the bastion",
    body=GrantCreateBody,
    response=bastion.GrantInfo,
    status=201,
    errors=(404, 409),
    owner=_granted_machine_app,
)
async def create_grant(request: web.Request, body: GrantCreateBody) -> web.Response:
    """Grant access; an unknown user is a 404."""
    reply = await ask_bastion(
        request, bastion.GrantAdd.model_validate(body.model_dump()), bastion.GrantInfo
    )
    request[AUDIT_TARGET] = reply.id
    return json_response(reply, status=201)


@routes.route(
    "GET", "/v1/grants", roles=OPS, summary="List grants", query=GrantQuery, response=GrantPage
)
async def list_grants(request: web.Request, query: GrantQuery) -> web.Response:
    """Live grants (expired ones too with ``include_expired``), optionally of one user."""
    cmd = bastion.GrantList(user=query.user, include_expired=query.include_expired)
    reply = await ask_bastion(request, cmd, bastion.GrantListing)
    return json_response(GrantPage(items=reply.grants))


@routes.route(
    "DELETE",
    "/v1/grants/{id}",
    roles=OPS,
    summary="Revoke a grant",
    params=GrantPath,
    response=bastion.GrantRevoked,
    errors=(404,),
)
async def delete_grant(request: web.Request) -> web.Response:
    """Revoke a grant: the sessions it let in end within 5 s."""
    grant_id = request.match_info["id"]
    reply = await ask_bastion(request, bastion.GrantRevoke(id=grant_id), bastion.GrantRevoked)
    return json_response(reply)
