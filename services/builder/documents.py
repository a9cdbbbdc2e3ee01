"""What the builder stores (``TypedDict``s of its documents)."""

from __future__ import annotations

from datetime import datetime
from typing import TypedDict

__all__ = ["BuildDoc", "LogChunkDoc"]


class BuildDoc(TypedDict, total=False):
    """``image_builds/<id>``: one build; only the builder writes it (one writer)."""

    _id: str
    name: str
    tag: str
    state: str  # queued | running | succeeded | failed
    spec: str  # JSON: its files, env and labels have keys FerretDB refuses ('.', '$')
    spec_digest: str
    policy: str  # JSON, as the spec
    policy_version: int
    requested_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempt: int
    step: str | None
    reason: str | None
    detail: str | None
    image: str | None
    image_id: str | None
    digest: str | None
    layers: int | None
    size: int | None
    sbom: list[str]
    listening: list[str]
    sync_jobs: list[str]
    log_seq: int


class LogChunkDoc(TypedDict):
    """``image_build_logs/<id>:<seq>``: one chunk of a build's log, inserted once."""

    _id: str
    build: str
    seq: int
    text: str
    at: datetime
