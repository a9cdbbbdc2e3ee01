"""The ``/v1/releases`` routes: the release system starts a rolling deploy and follows it."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from libs.common.contracts.releases import RELEASE_ID, ReleaseRequested, ReleaseSpec
from libs.common.errors import NotFoundError

from ..service import Releases, ReleaseStore
from .deps import RELEASE_STORE, RELEASES
from .framework import ANY, AUDIT_TARGET, WHO, Api, RouteTable, json_response
from .scopes import release_app

__all__ = [
    "RELEASE",
    "ReleaseCreate",
    "ReleaseOut",
    "ReleaseQuery",
    "add_release_routes",
    "routes",
]

RELEASE = frozenset({"admin", "release"})

routes = RouteTable()


class ReleaseCreate(ReleaseSpec):
    """A release request; ``release_id`` is minted when not given.

    The health check is either ``check``, the name of one declared for the app (``PUT
    /v1/apps/{app}/checks/{name}``), or an inline ``http``/``tcp`` ``health_check``, which only
    probes a port. An inline ``cmd`` would run any command as root in the app's machines: it is
    refused (422), whoever asks; declare it instead."""

    release_id: str | None = Field(default=None, max_length=64, pattern=RELEASE_ID)

    @model_validator(mode="after")
    def _declared_commands_only(self) -> ReleaseCreate:
        if self.check is not None and self.health_check is not None:
            raise ValueError("give check or health_check, not both")
        if self.health_check is not None and self.health_check.type == "cmd":
            raise ValueError(
                "a cmd health check runs only if ops declared it for the app "
                "(PUT /v1/apps/{app}/checks/{name}): name it with check"
            )
        return self


class ReleaseMachineOut(BaseModel):
    """One machine of a release."""

    status: str
    type: str
    host: str | None = None
    ip: str | None = None
    version: str | None = None
    reason: str | None = None
    detail: str | None = None
    rolled_back: bool | None = None
    at: datetime


class ReleaseOut(BaseModel):
    """A release and where each of its machines is."""

    id: str
    app: str
    version: str
    status: str
    reason: str | None
    requested_by: str
    spec: dict[str, Any]
    batches: list[list[str]]
    current_batch: int
    machines: dict[str, ReleaseMachineOut]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class ReleaseList(BaseModel):
    """Newest releases first."""

    items: list[ReleaseOut]


class ReleaseQuery(BaseModel):
    """``?app=&limit=`` of the release listing."""

    model_config = ConfigDict(extra="forbid")
    app: str | None = None
    limit: int = Field(default=50, ge=1, le=500)


def release_out(doc: dict[str, Any]) -> ReleaseOut:
    """The API view of a release document."""
    return ReleaseOut(
        id=doc["_id"],
        batches=[b["machines"] for b in doc["batches"]],
        **{k: v for k, v in doc.items() if k not in ("_id", "batches")},
    )


@routes.route(
    "POST",
    "/v1/releases",
    roles=RELEASE,
    summary="Start a release",
    body=ReleaseCreate,
    response=ReleaseOut,
    status=202,
    errors=(403, 404, 409),
)
async def create_release(request: web.Request, body: ReleaseCreate) -> web.Response:
    """Start a rolling deploy (idempotent on ``release_id``)."""
    req = ReleaseRequested(
        **body.model_dump(exclude={"release_id"}),
        release_id=body.release_id or f"rel-{uuid.uuid4().hex[:12]}",
    )
    request[AUDIT_TARGET] = req.release_id
    doc = await request.app[RELEASES].request(req, requested_by=request[WHO].name)
    return json_response(release_out(doc), status=202)


@routes.route(
    "GET",
    "/v1/releases",
    roles=ANY,
    summary="List releases",
    query=ReleaseQuery,
    response=ReleaseList,
)
async def list_releases(request: web.Request, query: ReleaseQuery) -> web.Response:
    """Newest releases first, optionally of one app."""
    docs = await request.app[RELEASE_STORE].list(query.app, query.limit)
    return json_response(ReleaseList(items=[release_out(d) for d in docs]))


@routes.route(
    "GET",
    "/v1/releases/{release_id}",
    roles=ANY,
    summary="Show a release",
    response=ReleaseOut,
    errors=(404,),
    owner=release_app,
)
async def show_release(request: web.Request) -> web.Response:
    """One release and where each of its machines is."""
    rid = request.match_info["release_id"]
    doc = await request.app[RELEASE_STORE].get(rid)
    if doc is None:
        raise NotFoundError(f"no release {rid}")
    return json_response(release_out(doc))


def add_release_routes(api: Api, releases: Releases, store: ReleaseStore) -> None:
    """Add the release routes to ``api``, with the release use case and store they call."""
    api.provide(RELEASES, releases)
    api.provide(RELEASE_STORE, store)
    api.include(routes)
