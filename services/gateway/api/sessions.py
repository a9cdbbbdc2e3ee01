"""The ``/v1/sessions`` routes: what people did through the bastion, and their recordings.
Sessions belong to the bastion, so each route is one or more RPCs to it (:mod:`.bastion_rpc`).

Roles: anyone with a token may list sessions and read their metadata; the recording (what the
user saw, and typed when her grant says so, which may hold secrets) and ending a live session
are for ops.

A recording is streamed as ``application/x-asciicast`` in the bastion's chunks (at most 1 MiB
each, one RPC apiece), so the gateway never holds a whole cast. A live session's cast is served
as far as it is written at the time of the request.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Self

import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from libs.common.contracts import bastion
from libs.common.errors import DomainError, TransientError

from ..domain.models import IsoDatetime
from .bastion_rpc import ask_bastion
from .framework import ANY, OPS, RouteTable, json_response
from .users import USER_NAME_RE

__all__ = ["ASCIICAST", "SessionPage", "SessionPath", "SessionQuery", "routes"]

routes = RouteTable()
log = structlog.get_logger("gateway.api")

ASCIICAST = "application/x-asciicast"


class SessionQuery(BaseModel):
    """``?user=&ip=&machine_id=&from=&to=&live=&limit=``: ``from`` and ``to`` bound the start."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    user: str | None = Field(default=None, pattern=USER_NAME_RE)
    ip: str | None = Field(default=None, max_length=64)
    machine_id: str | None = Field(default=None, max_length=64)
    since: IsoDatetime | None = Field(default=None, alias="from")
    until: IsoDatetime | None = Field(default=None, alias="to")
    live: bool = False
    limit: int = Field(default=100, ge=1, le=1000)

    @field_validator("since", "until")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        # A time without an offset (the CLI's --from 2026-11-29) is UTC, as every stored time;
        # so it also compares with one that has an offset.
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.since and self.until and self.since > self.until:
            raise ValueError("from is after to")
        return self


class SessionPath(BaseModel):
    """``{id}``: a session."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class SessionPage(BaseModel):
    """Sessions, newest first."""

    items: list[bastion.SessionInfo]


@routes.route(
    "GET",
    "/v1/sessions",
    roles=ANY,
    summary="List bastion sessions",
    query=SessionQuery,
    response=SessionPage,
)
async def list_sessions(request: web.Request, query: SessionQuery) -> web.Response:
    """Sessions, newest first, by user, machine IP or id, and start time range."""
    cmd = bastion.SessionList(
        user=query.user,
        ip=query.ip,
        machine_id=query.machine_id,
        since=query.since,
        until=query.until,
        live_only=query.live,
        limit=query.limit,
    )
    reply = await ask_bastion(request, cmd, bastion.SessionListing)
    return json_response(SessionPage(items=reply.sessions))


@routes.route(
    "GET",
    "/v1/sessions/{id}",
    roles=ANY,
    summary="Show a bastion session",
    params=SessionPath,
    response=bastion.SessionInfo,
    errors=(404,),
)
async def get_session(request: web.Request) -> web.Response:
    """One session: who, where, when, how it ended, how many bytes."""
    cmd = bastion.SessionGet(id=request.match_info["id"])
    return json_response(await ask_bastion(request, cmd, bastion.SessionInfo))


@routes.route(
    "DELETE",
    "/v1/sessions/{id}",
    roles=OPS,
    summary="End a live bastion session",
    params=SessionPath,
    response=bastion.SessionEndRequested,
    errors=(404,),
)
async def end_session(request: web.Request) -> web.Response:
    """End a live session (a session already over is answered with ``was_live: false``)."""
    cmd = bastion.SessionEnd(id=request.match_info["id"])
    return json_response(await ask_bastion(request, cmd, bastion.SessionEndRequested))


async def _chunk(request: web.Request, session_id: str, offset: int) -> bastion.RecordingChunk:
    cmd = bastion.RecordingGet(session_id=session_id, offset=offset)
    return await ask_bastion(request, cmd, bastion.RecordingChunk)


@routes.route(
    "GET",
    "/v1/sessions/{id}/recording",
    roles=OPS,
    summary="Download a session's recording (asciicast v2)",
    params=SessionPath,
    errors=(404,),
)
async def get_recording(request: web.Request) -> web.StreamResponse:
    """The session's cast, streamed chunk by chunk (a live one as far as it is written)."""
    session_id = request.match_info["id"]
    # The first chunk before any byte is sent, so an unknown session is still a clean 404.
    chunk = await _chunk(request, session_id, 0)
    headers = {"Content-Disposition": f'inline; filename="{session_id}.cast"'}
    if chunk.eof or (chunk.live and not chunk.data):
        return web.Response(body=chunk.data.encode("ascii"), content_type=ASCIICAST,
                            headers=headers)  # fmt: skip
    resp = web.StreamResponse(headers={**headers, "Content-Type": ASCIICAST})
    await resp.prepare(request)
    while True:
        await resp.write(chunk.data.encode("ascii"))
        if chunk.eof or not chunk.data or chunk.next_offset <= chunk.offset:
            break
        try:
            chunk = await _chunk(request, session_id, chunk.next_offset)
        except (DomainError, TransientError) as err:
            # The status is sent: the client must see a cut stream (no final chunk), not a
            # complete cast that is silently short.
            log.warning("recording stream cut", session_id=session_id, error=str(err))
            if request.transport is not None:
                request.transport.close()
            return resp
    await resp.write_eof()
    return resp
