"""Ports of imagesync: what the replication logic needs from a registry and from its store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from .domain import Manifest

__all__ = ["BlobIndex", "BlobStream", "Registry"]


class BlobStream(Protocol):
    """A blob being read: its announced size and its chunks."""

    size: int | None

    def chunks(self) -> AsyncIterator[bytes]:
        """The blob's bytes, chunk by chunk (never the whole blob at once)."""
        ...


class Registry(Protocol):
    """Port: one dc's registry, through the Registry HTTP API V2."""

    dc: str
    host: str

    async def manifest_digest(self, repo: str, reference: str) -> str | None:
        """The digest ``reference`` (a tag or digest) resolves to, or None if absent."""
        ...

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        """The manifest, verified against ``reference`` when it is a digest."""
        ...

    async def put_manifest(self, repo: str, reference: str, manifest: Manifest) -> str:
        """Store ``manifest`` under ``reference``; return the digest the registry computed."""
        ...

    async def blob_exists(self, repo: str, digest: str) -> bool:
        """Whether ``repo`` serves the blob."""
        ...

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Mount the blob from ``from_repo`` of the same registry; False if it could not."""
        ...

    def open_blob(self, repo: str, digest: str) -> AbstractAsyncContextManager[BlobStream]:
        """Open the blob for streaming."""
        ...

    async def upload_blob(
        self, repo: str, digest: str, chunks: AsyncIterator[bytes], size: int | None = None
    ) -> int:
        """Stream ``chunks`` into ``repo`` as ``digest``, verifying it; return the bytes sent."""
        ...

    async def catalog(self) -> list[str]:
        """Every repository name."""
        ...

    async def tags(self, repo: str) -> list[str]:
        """Every tag of ``repo``."""
        ...


class BlobIndex(Protocol):
    """Port: which repositories of a registry are known to hold a blob (for mounts)."""

    async def where(self, dc: str, digest: str) -> list[str]:
        """Repositories of ``dc`` known to hold ``digest``."""
        ...

    async def add(self, dc: str, digest: str, repo: str) -> None:
        """Remember that ``repo`` of ``dc`` holds ``digest``."""
        ...
