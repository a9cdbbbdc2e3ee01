"""The ``/v1/users`` and ``/v1/command-rules`` routes: the bastion's people and the commands it
refuses. Both belong to the bastion, so each route is one RPC to it (:mod:`.bastion_rpc`).

Roles: an admin registers and removes people and edits the command rules; ops (who grant
access) may list both.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from libs.common.contracts import bastion

from ..domain.models import SshKey
from .bastion_rpc import ask_bastion
from .framework import ADMIN, AUDIT_TARGET, OPS, RouteTable, json_response

__all__ = [
    "RuleCreateBody",
    "RulePage",
    "RulePath",
    "UserCreateBody",
    "UserPage",
    "UserPath",
    "routes",
]

routes = RouteTable()

USER_NAME_RE = r"^[a-z][a-z0-9._-]{0,31}$"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserCreateBody(_Request):
    """``POST /v1/users``: a person and her SSH public keys (replaces the keys if she exists)."""

    name: str = Field(pattern=USER_NAME_RE)
    ssh_keys: list[SshKey] = Field(min_length=1, max_length=32)


class UserPath(_Request):
    """``{name}``: a bastion user."""

    name: str = Field(pattern=USER_NAME_RE)


class UserPage(BaseModel):
    """The bastion's users."""

    items: list[bastion.UserInfo]


class RuleCreateBody(_Request):
    """``POST /v1/command-rules``: a Python regular expression refused in exec commands and in
    lines typed in a shell."""

    pattern: str = Field(min_length=1, max_length=1000)
    description: str = Field(default="", max_length=200)


class RulePath(_Request):
    """``{id}``: a command rule."""

    id: str = Field(min_length=1, max_length=64)


class RulePage(BaseModel):
    """The command rules."""

    items: list[bastion.RuleInfo]


# ---- users -----------------------------------------------------------------------------------


@routes.route(
    "POST",
    "/v1/users",
    roles=ADMIN,
    summary="Register a bastion user",
    body=UserCreateBody,
    response=bastion.UserInfo,
    status=201,
    errors=(409,),
)
async def create_user(request: web.Request, body: UserCreateBody) -> web.Response:
    """Register a person with her keys (idempotent by name: her keys are replaced)."""
    request[AUDIT_TARGET] = body.name
    cmd = bastion.UserAdd(name=body.name, ssh_keys=list(body.ssh_keys))
    return json_response(await ask_bastion(request, cmd, bastion.UserInfo), status=201)


@routes.route("GET", "/v1/users", roles=OPS, summary="List bastion users", response=UserPage)
async def list_users(request: web.Request) -> web.Response:
    """Every registered user with her key fingerprints."""
    reply = await ask_bastion(request, bastion.UserList(), bastion.UserListing)
    return json_response(UserPage(items=reply.users))


@routes.route(
    "DELETE",
    "/v1/users/{name}",
    roles=ADMIN,
    summary="Remove a bastion user",
    params=UserPath,
    response=bastion.UserRemoved,
    errors=(404,),
)
async def delete_user(request: web.Request) -> web.Response:
    """Remove a user: her grants go and her live sessions end within 5 s."""
    name = request.match_info["name"]
    request[AUDIT_TARGET] = name
    reply = await ask_bastion(request, bastion.UserRemove(name=name), bastion.UserRemoved)
    return json_response(reply)


# ---- command rules ---------------------------------------------------------------------------


@routes.route(
    "POST",
    "/v1/command-rules",
    roles=ADMIN,
    summary="Add a command rule",
    body=RuleCreateBody,
    response=bastion.RuleInfo,
    status=201,
    errors=(409,),
)
async def create_rule(request: web.Request, body: RuleCreateBody) -> web.Response:
    """Add a rule; a pattern that is not a regular expression is a 422 on ``pattern``."""
    cmd = bastion.RuleAdd(pattern=body.pattern, description=body.description)
    reply = await ask_bastion(request, cmd, bastion.RuleInfo)
    request[AUDIT_TARGET] = reply.id
    return json_response(reply, status=201)


@routes.route(
    "GET", "/v1/command-rules", roles=OPS, summary="List command rules", response=RulePage
)
async def list_rules(request: web.Request) -> web.Response:
    """The command rules, oldest first."""
    reply = await ask_bastion(request, bastion.RuleList(), bastion.RuleListing)
    return json_response(RulePage(items=reply.rules))


@routes.route(
    "DELETE",
    "/v1/command-rules/{id}",
    roles=ADMIN,
    summary="Remove a command rule",
    params=RulePath,
    response=bastion.RuleRemoved,
    errors=(404,),
)
async def delete_rule(request: web.Request) -> web.Response:
    """Remove a command rule."""
    rule_id = request.match_info["id"]
    reply = await ask_bastion(request, bastion.RuleRemove(id=rule_id), bastion.RuleRemoved)
    return json_response(reply)
