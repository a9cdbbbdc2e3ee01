"""The ``/v1/images/builds`` routes and ``/v1/images``: image builds, which the builder runs.

The gateway checks a spec against the policy in force before anything runs: every item the
policy refuses is one entry of a 422, and nothing is stored or sent. A spec that passes goes to
the builder as one RPC (``builder.build.submit``, idempotent by the build id the gateway
makes), with the policy version it was checked against; the builder stores and queues it and
answers at once (202). Everything else is a query of the builder.

``GET /v1/images/builds/{id}/log`` streams the log as ``text/plain`` while the build runs: the
builder's chunks are asked for one RPC at a time after the last one sent, and the stream ends
when the build has ended and every chunk was sent.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from libs.common.contracts import Message
from libs.common.contracts import builder as bld
from libs.common.errors import ConflictError, DomainError, NotFoundError, TransientError

from .deps import rpc_call
from .framework import ANY, AUDIT_TARGET, OPS, WHO, FieldErrors, RouteTable, json_response
from .policy import POLICY

__all__ = ["BuildPath", "BuildQuery", "ImageQuery", "LogQuery", "routes"]

routes = RouteTable()
log = structlog.get_logger("gateway.api")
R = TypeVar("R", bound=Message)
# How often a followed log asks the builder for more while the build runs.
LOG_POLL_S = 0.5


class BuildPath(BaseModel):
    """The ``{id}`` of a build (an unknown one is the builder's 404)."""

    id: str = Field(min_length=1, max_length=64)


class BuildQuery(BaseModel):
    """``?state=&name=&limit=`` on the build listing."""

    model_config = ConfigDict(extra="forbid")
    state: bld.BuildState | None = None
    name: str | None = Field(default=None, pattern=bld.REPO_RE, max_length=200)
    limit: int = Field(default=100, ge=1, le=1000)


class LogQuery(BaseModel):
    """``?follow=false`` returns what is written so far instead of following the build."""

    model_config = ConfigDict(extra="forbid")
    follow: bool = True


class ImageQuery(BaseModel):
    """``?name=`` narrows the image listing to one repository."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, pattern=bld.REPO_RE, max_length=200)


async def ask_builder(request: web.Request, msg: Message, expect: type[R]) -> R:
    """Send ``msg`` to the builder; its reply, or the problem its refusal means."""
    reply = await rpc_call(request, msg)
    if isinstance(reply, expect):
        return reply
    if isinstance(reply, bld.BuildRejected):
        detail = reply.detail or reply.reason
        if reply.reason == "not_found":
            raise NotFoundError(detail, reason="build_not_found")
        if reply.reason == "invalid":
            raise FieldErrors.one(reply.field or "body", "invalid", detail)
        raise ConflictError(detail, reason=reply.reason)
    raise TransientError(f"the builder answered {msg.TYPE} with {reply.TYPE}")


@routes.route(
    "POST",
    "/v1/images/builds",
    roles=OPS,
    summary="Build an image from a spec, under the policy",
    body=bld.BuildSpec,
    status=202,
)
async def create_build(request: web.Request, body: bld.BuildSpec) -> web.Response:
    """Check the spec against the policy (422 naming every offending item), then queue it."""
    current = await request.app[POLICY].current()
    violations = bld.policy_violations(body, current.policy)
    if violations:
        raise FieldErrors([v.model_dump() for v in violations])
    build_id = f"b-{uuid.uuid4().hex[:16]}"
    request[AUDIT_TARGET] = f"{build_id} {body.name}:{body.tag}"
    cmd = bld.BuildSubmit(
        id=build_id,
        spec=body,
        policy=current.policy,
        policy_version=current.version,
        requested_by=request[WHO].name,
        spec_digest=bld.spec_digest(body),
    )
    info = await ask_builder(request, cmd, bld.BuildInfo)
    return json_response(info.model_dump(mode="json"), status=202)


@routes.route(
    "GET", "/v1/images/builds", roles=ANY, summary="List image builds", query=BuildQuery
)
async def list_builds(request: web.Request, query: BuildQuery) -> web.Response:
    """Builds, newest first."""
    msg = bld.BuildList(state=query.state, name=query.name, limit=query.limit)
    listing = await ask_builder(request, msg, bld.BuildListing)
    return json_response(listing.model_dump(mode="json")["builds"])


@routes.route(
    "GET",
    "/v1/images/builds/{id}",
    roles=ANY,
    summary="One image build",
    params=BuildPath,
    errors=(404,),
)
async def get_build(request: web.Request) -> web.Response:
    """A build: its state, step, reason, SBOM, digest."""
    info = await ask_builder(request, bld.BuildGet(id=request.match_info["id"]), bld.BuildInfo)
    return json_response(info.model_dump(mode="json"))


async def _chunk(request: web.Request, build_id: str, after: int) -> bld.BuildLogChunk:
    return await ask_builder(request, bld.BuildLog(id=build_id, after=after), bld.BuildLogChunk)


@routes.route(
    "GET",
    "/v1/images/builds/{id}/log",
    roles=ANY,
    summary="A build's log, streamed while it runs",
    params=BuildPath,
    query=LogQuery,
    errors=(404,),
)
async def build_log(request: web.Request, query: LogQuery) -> web.StreamResponse:
    """The log as text; followed until the build ends unless ``follow=false``."""
    build_id = request.match_info["id"]
    # The first read before any byte is sent, so an unknown build is still a clean 404.
    chunk = await _chunk(request, build_id, -1)
    resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
    await resp.prepare(request)
    after = -1
    while True:
        for line in chunk.chunks:
            await resp.write(line.text.encode())
            after = line.seq
        if chunk.done or (not query.follow and len(chunk.chunks) == 0):
            break
        if not chunk.chunks:
            await asyncio.sleep(LOG_POLL_S)
        try:
            chunk = await _chunk(request, build_id, after)
        except (DomainError, TransientError) as err:
            # The status is sent: the client must see a cut stream, not a short complete log.
            log.warning("build log stream cut", build_id=build_id, error=str(err))
            if request.transport is not None:
                request.transport.close()
            return resp
    await resp.write_eof()
    return resp


@routes.route("GET", "/v1/images", roles=ANY, summary="Platform-built image tags", query=ImageQuery)
async def list_images(request: web.Request, query: ImageQuery) -> web.Response:
    """Tags the platform built, with who built each, from which spec, and each dc's digest."""
    bases = [b.image for b in (await request.app[POLICY].current()).policy.bases]
    msg = bld.ImageList(name=query.name, bases=bases)
    listing = await ask_builder(request, msg, bld.ImageListing)
    return json_response(listing.model_dump(mode="json")["images"])
