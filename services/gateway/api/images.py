"""Routes answered by imagesync (one RPC each): replication jobs, and what each registry holds."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from libs.common.contracts import imagesync as isync
from libs.common.errors import NotFoundError, TransientError

from .deps import rpc_call
from .framework import ANY, FieldErrors, RouteTable, json_response

__all__ = ["RegistriesQuery", "SyncJobsQuery", "routes"]

routes = RouteTable()

# A registry's first listing walks its storage (seconds on S3, more as it grows): imagesync
# keeps the names after that, but the first answer may take longer than a query of our state.
_CATALOG_TIMEOUT_S = 30.0


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


class RegistriesQuery(BaseModel):
    """Which registries and repositories to list (typed as imagesync's query)."""

    model_config = ConfigDict(extra="forbid")
    dc: str | None = Field(default=None, pattern=isync.NAME_RE)
    prefix: str | None = Field(default=None, max_length=255)
    limit: int = Field(default=100, ge=1, le=1000)


@routes.route(
    "GET",
    "/v1/registries",
    roles=ANY,
    summary="What each dc's registry holds: repositories, tags and digests, read live",
    query=RegistriesQuery,
)
async def registries(request: web.Request, query: RegistriesQuery) -> web.Response:
    """Each registry's catalog as it is now (``limit`` repositories per registry)."""
    cmd = isync.RegistryCatalogList(dc=query.dc, prefix=query.prefix, limit=query.limit)
    reply = await rpc_call(request, cmd, at_least_s=_CATALOG_TIMEOUT_S)
    if not isinstance(reply, isync.RegistryCatalogListed):
        raise TransientError(f"imagesync answered registry.catalog with {reply.TYPE}")
    if query.dc is not None and not reply.registries:
        raise NotFoundError(f"no registry for dc {query.dc!r}")
    return json_response(reply.model_dump(mode="json"))
