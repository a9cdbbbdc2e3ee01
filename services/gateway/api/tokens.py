"""The ``/v1/tokens`` routes: admins create, list and revoke bearer tokens.

A token's secret is shown once, in the answer to its creation; the store keeps only its hash.
A token may be scoped to some apps (``apps``): the route wrapper then refuses, with a 403, any
request that names another app or a machine or release of another app.
"""

from __future__ import annotations

import secrets

from aiohttp import web

from libs.common.errors import ConflictError, NotFoundError

from ..domain.models import TokenCreate, TokenCreated, TokenList, TokenOut
from .deps import STORE
from .framework import ADMIN, AUDIT_TARGET, WHO, RouteTable, json_response

__all__ = ["routes"]

routes = RouteTable()


@routes.route(
    "POST",
    "/v1/tokens",
    roles=ADMIN,
    summary="Create a token",
    body=TokenCreate,
    response=TokenCreated,
    status=201,
)
async def create_token(request: web.Request, body: TokenCreate) -> web.Response:
    """A new token with its role and scope; the secret is in this answer only."""
    secret = f"dvm_{secrets.token_urlsafe(32)}"
    apps = sorted(set(body.apps)) if body.apps is not None else None
    doc = await request.app[STORE].add_token(secret, body.name, body.role, apps)
    request[AUDIT_TARGET] = doc["_id"]
    return json_response(
        TokenCreated(
            id=doc["_id"],
            name=doc["name"],
            role=doc["role"],
            apps=doc.get("apps"),
            created_at=doc["created_at"],
            token=secret,
        ),
        status=201,
    )


@routes.route("GET", "/v1/tokens", roles=ADMIN, summary="List tokens", response=TokenList)
async def list_tokens(request: web.Request) -> web.Response:
    """Every token's metadata, revoked ones included."""
    docs = await request.app[STORE].list_tokens()
    return json_response(
        TokenList(
            items=[
                TokenOut(
                    id=d["_id"],
                    name=d["name"],
                    role=d["role"],
                    apps=d.get("apps"),
                    created_at=d["created_at"],
                    revoked=d.get("revoked", False),
                )
                for d in docs
            ]
        )
    )


@routes.route(
    "DELETE",
    "/v1/tokens/{id}",
    roles=ADMIN,
    summary="Revoke a token",
    status=204,
    errors=(404, 409),
)
async def revoke_token(request: web.Request) -> web.Response:
    """Revoke a token; it stops working at once. A token cannot revoke itself, so the caller
    is always left an admin token: revoking the last one would lock every admin out."""
    tid = request.match_info["id"]
    if tid == request[WHO].token_id:
        raise ConflictError(
            "a token cannot revoke itself: revoke it with another admin token",
            reason="own_token",
        )
    if not await request.app[STORE].revoke_token(tid):
        raise NotFoundError(f"no token {tid}", reason="token_not_found")
    return web.Response(status=204)
