"""Messages of the imagesync service: the commands it accepts and the events it emits.

- ``image.pushed`` (event): a registry reported a manifest push with a tag (from its webhook).
- ``image.sync`` (command): copy ``repo:tag`` from ``source`` to ``target``; idempotent by
  ``(source, target, repo, tag, digest)``.
- ``image.replicated`` (event): ``target`` now serves ``repo:tag`` at ``digest``; the gateway
  pre-warms that dc's hosts.
- ``image.sync_failed`` (event): a copy failed for good after its attempts.
- ``sync_jobs.list`` (RPC query) answered by ``sync_jobs.listed``.
- ``registry.catalog`` (RPC query) answered by ``registry.catalog_listed``: what each dc's
  registry holds now, read from its catalog (repositories, tags and their digests).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .envelope import Command, Event, register

__all__ = [
    "CatalogRepo",
    "CatalogTag",
    "ImagePushed",
    "ImageReplicated",
    "ImageSync",
    "ImageSyncFailed",
    "RegistryCatalogList",
    "RegistryCatalogListed",
    "RegistryHoldings",
    "SyncJobView",
    "SyncJobsList",
    "SyncJobsListed",
]

REPO_RE = r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
TAG_RE = r"^[\w][\w.-]{0,127}$"
DIGEST_RE = r"^sha256:[a-f0-9]{64}$"
NAME_RE = r"^[a-z0-9][a-z0-9-]{0,31}$"

JobState = Literal["pending", "running", "done", "failed", "superseded"]


@register
class ImagePushed(Event):
    """``dc``'s registry holds a new manifest under ``repo:tag`` (a push, not our own copy)."""

    TYPE = "image.pushed"
    registry: str  # host:port of the registry, as used in image references
    dc: str
    repo: str
    tag: str
    digest: str
    media_type: str = ""
    size: int = 0
    event_id: str = ""
    blobs: list[str] = Field(default_factory=list)  # config and layer digests, when known


@register
class ImageSync(Command):
    """Copy ``repo:tag`` from the ``source`` dc's registry to ``target``'s.

    ``digest`` pins the manifest; without it the source's current digest is used.
    """

    TYPE = "image.sync"
    source: str = Field(pattern=NAME_RE)
    target: str = Field(pattern=NAME_RE)
    repo: str = Field(max_length=255, pattern=REPO_RE)
    tag: str = Field(pattern=TAG_RE)
    digest: str | None = Field(default=None, pattern=DIGEST_RE)
    reason: Literal["push", "reconcile", "manual"] = "manual"


@register
class ImageReplicated(Event):
    """``registry`` (of ``dc``) now serves ``repo:tag`` at ``digest``: pre-warm its hosts."""

    TYPE = "image.replicated"
    registry: str
    dc: str
    repo: str
    tag: str
    digest: str
    ref: str = ""  # registry/repo:tag, ready for a pull
    source_dc: str = ""
    bytes_copied: int = 0


@register
class ImageSyncFailed(Event):
    """The copy of ``repo:tag`` to ``dc`` failed for good; ``reason`` is a stable code."""

    TYPE = "image.sync_failed"
    registry: str
    dc: str
    source_dc: str
    repo: str
    tag: str
    digest: str | None = None
    reason: str
    detail: str = ""
    attempts: int = 0


class SyncJobView(BaseModel):
    """One replication job as the gateway shows it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    source: str
    target: str
    repo: str
    tag: str
    digest: str | None
    state: JobState
    attempts: int = 0
    bytes_copied: int = 0
    blobs_copied: int = 0
    blobs_skipped: int = 0
    blobs_mounted: int = 0
    error: str | None = None
    reason: str = ""
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None


@register
class SyncJobsList(Command):
    """RPC query: the most recent jobs, newest first, optionally filtered."""

    TYPE = "sync_jobs.list"
    state: JobState | None = None
    repo: str | None = Field(default=None, max_length=255)
    target: str | None = None
    limit: int = Field(default=100, ge=1, le=1000)


@register
class SyncJobsListed(Event):
    """Reply to ``sync_jobs.list``."""

    TYPE = "sync_jobs.listed"
    jobs: list[SyncJobView]


class CatalogTag(BaseModel):
    """A tag a registry holds and the manifest digest it points at."""

    model_config = ConfigDict(frozen=True)

    tag: str
    digest: str


class CatalogRepo(BaseModel):
    """A repository of a registry's catalog with its tags."""

    model_config = ConfigDict(frozen=True)

    repo: str
    tags: list[CatalogTag]


class RegistryHoldings(BaseModel):
    """What one dc's registry holds, as its catalog says now (``reachable`` false: ``error``)."""

    model_config = ConfigDict(frozen=True)

    dc: str
    host: str
    reachable: bool
    error: str | None = None
    repositories: list[CatalogRepo] = []
    # More repositories matched than ``limit``: the first ``limit`` in catalog order are listed.
    truncated: bool = False


@register
class RegistryCatalogList(Command):
    """RPC query: each registry's repositories (those starting with ``prefix``), tags, digests."""

    TYPE = "registry.catalog"
    dc: str | None = Field(default=None, pattern=NAME_RE)
    prefix: str | None = Field(default=None, max_length=255)
    limit: int = Field(default=100, ge=1, le=1000)


@register
class RegistryCatalogListed(Event):
    """Reply to ``registry.catalog``: one entry per registry of the topology (or the one asked)."""

    TYPE = "registry.catalog_listed"
    registries: list[RegistryHoldings]
