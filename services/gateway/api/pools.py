"""The ``/v1/pools`` routes: address pools belong to ipam, so each is one RPC to it.

ipam's rejections are translated here: bad input becomes a 422 on the field at fault, an
unknown pool a 404, anything else a 409.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from libs.common.contracts import Message, ipam
from libs.common.errors import ConflictError, DomainError, NotFoundError, TransientError

from ..domain.models import PoolCreateBody, PoolPatchBody
from .deps import rpc_call
from .framework import ANY, AUDIT_TARGET, OPS, FieldErrors, RouteTable, json_response

__all__ = ["PoolQuery", "routes"]

routes = RouteTable()

# Rejections that are bad input (422 on a field) rather than a conflict with existing pools.
_POOL_INPUT_REASONS = {
    "invalid_cidr": "cidr",
    "invalid_gateway": "gateway",
    "gateway_outside": "gateway",
    "invalid_reserved": "reserved",
    "invalid": "cidr",
}


class PoolQuery(BaseModel):
    """``?dc=`` on a pool listing."""

    model_config = ConfigDict(extra="forbid")
    dc: str | None = None


@routes.route(
    "POST",
    "/v1/pools",
    roles=OPS,
    summary="Create a pool",
    body=PoolCreateBody,
    status=201,
    errors=(409, 503),
)
async def create_pool(request: web.Request, body: PoolCreateBody) -> web.Response:
    """Ask ipam to create a pool."""
    try:
        cmd = ipam.PoolCreate.model_validate(body.model_dump())
    except ValueError as err:
        raise DomainError(str(err), reason="invalid") from err
    reply = await rpc_call(request, cmd)
    request[AUDIT_TARGET] = body.name
    if isinstance(reply, ipam.PoolRejected):
        if reply.reason in _POOL_INPUT_REASONS:
            field = _POOL_INPUT_REASONS[reply.reason]
            raise FieldErrors.one(field, reply.reason, reply.detail or reply.reason)
        raise ConflictError(f"pool rejected: {reply.reason}: {reply.detail}", reason=reply.reason)
    return json_response({"name": body.name, "status": "created"}, status=201)


def _pool_outcome(reply: Message, name: str) -> None:
    """Raise what ipam's answer to a change or a delete means, if it refused."""
    if not isinstance(reply, ipam.PoolRejected):
        return
    if reply.reason == "unknown_pool":
        raise NotFoundError(f"no pool {name}", reason="pool_not_found")
    if reply.reason in _POOL_INPUT_REASONS:
        # The body model already bounds cooldown_s: what ipam can find wrong is reserved.
        raise FieldErrors.one("reserved", reply.reason, reply.detail or reply.reason)
    raise ConflictError(f"pool {name}: {reply.reason}: {reply.detail}", reason=reply.reason)


@routes.route(
    "PATCH",
    "/v1/pools/{name}",
    roles=OPS,
    summary="Change a pool's reserved addresses or cooldown",
    body=PoolPatchBody,
    errors=(404, 409, 503),
)
async def patch_pool(request: web.Request, body: PoolPatchBody) -> web.Response:
    """Ask ipam to change a pool's reserved addresses or cooldown."""
    name = request.match_info["name"]
    request[AUDIT_TARGET] = name
    reply = await rpc_call(
        request, ipam.PoolUpdate(name=name, reserved=body.reserved, cooldown_s=body.cooldown_s)
    )
    _pool_outcome(reply, name)
    return json_response({"name": name, "status": "updated"})


@routes.route(
    "DELETE",
    "/v1/pools/{name}",
    roles=OPS,
    summary="Delete a pool without leases",
    errors=(404, 409, 503),
)
async def delete_pool(request: web.Request) -> web.Response:
    """Ask ipam to delete a pool that holds no lease."""
    name = request.match_info["name"]
    request[AUDIT_TARGET] = name
    _pool_outcome(await rpc_call(request, ipam.PoolDelete(name=name)), name)
    return json_response({"name": name, "status": "deleted"})


@routes.route("GET", "/v1/pools", roles=ANY, summary="List pools with usage", query=PoolQuery)
async def list_pools(request: web.Request, query: PoolQuery) -> web.Response:
    """ipam's pools, with their usage."""
    reply = await rpc_call(request, ipam.PoolList(dc=query.dc))
    if not isinstance(reply, ipam.PoolListing):
        # An ipam of another version answered: worth retrying once it is upgraded, not a bug here.
        raise TransientError(f"ipam answered the pool listing with {reply.TYPE}")
    return json_response(reply.model_dump(mode="json"))
