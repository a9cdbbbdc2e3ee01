"""The ``/v1/images`` routes: image replication jobs, which imagesync owns (one RPC)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from libs.common.contracts import imagesync as isync

from .deps import rpc_call
from .framework import ANY, FieldErrors, RouteTable, json_response

__all__ = ["SyncJobsQuery", "routes"]

routes = RouteTable()


class SyncJobsQuery(BaseModel):
    """Filters of the sync job listing (typed as imagesync's query, so the document says what
    imagesync accepts)."""

    model_config = ConfigDict(extra="forbid")
    state: isync.JobState | None = None
    repo: str | None = Field(default=None, max_length=255)
    limit: int = Field(default=100, ge=1, le=1000)


@routes.route(
    "GET", "/v1/images/sync-jobs", roles=ANY, summary="Image replication jobs", query=SyncJobsQuery
)
async def sync_jobs(request: web.Request, query: SyncJobsQuery) -> web.Response:
    """imagesync's replication jobs, filtered."""
    try:
        cmd = isync.SyncJobsList(state=query.state, repo=query.repo, limit=query.limit)
    except ValueError as err:
        raise FieldErrors.one("query", "invalid", str(err)) from err
    reply = await rpc_call(request, cmd)
    return json_response(reply.model_dump(mode="json"))
