"""The builder's ports: the Docker Engine, the registries' manifests, the build store."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .documents import BuildDoc

__all__ = ["BuildError", "BuildStore", "Engine", "Registries", "Verification"]


class BuildError(Exception):
    """The engine refused or failed the build (a RUN exited non-zero, a push failed)."""


@dataclass(frozen=True, slots=True)
class Verification:
    """What the started image showed: its packages (dpkg-query) and its sockets (ss)."""

    dpkg: str
    sockets: str


class Engine(Protocol):
    """Port: the Docker Engine the builder drives (blocking calls run in threads)."""

    async def ensure_image(self, image: str, registry: str) -> None:
        """Have ``image`` locally, pulling ``registry/image`` if it is missing."""
        ...

    async def build(
        self,
        context: bytes,
        labels: dict[str, str],
        on_line: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> str:
        """Build the context; the image id. Log lines go to ``on_line``; raise BuildError."""
        ...

    async def shape(self, image_id: str) -> tuple[int, int, str]:
        """The image's layer count, size in bytes, and fingerprint (a hash of its layers and
        runtime config: what decides what the started image shows)."""
        ...

    async def packages(self, image: str) -> str:
        """``dpkg-query`` output of ``image`` (run once, no network)."""
        ...

    async def verify(self, image_id: str, name: str, settle_s: float) -> Verification:
        """Start the image once with no network under ``name``; its packages and sockets."""
        ...

    async def push(self, image_id: str, repo: str, tag: str, on_line: Callable[[str], None]) -> str:
        """Tag and push ``repo:tag`` (``repo`` includes the registry); the pushed digest."""
        ...

    async def discard(self, image_id: str) -> None:
        """Remove a build's image (best effort: a layer shared with others stays)."""
        ...


class Registries(Protocol):
    """Port: what each dc's registry holds under a tag."""

    async def digest(self, dc: str, repo: str, tag: str) -> str | None:
        """The manifest digest of ``repo:tag`` in ``dc``'s registry, or None."""
        ...


class BuildStore(Protocol):
    """Port: builds and their log chunks."""

    async def insert(self, doc: BuildDoc) -> BuildDoc:
        """Store a new build; the existing one if its id is taken (idempotent submit)."""
        ...

    async def get(self, build_id: str) -> BuildDoc | None:
        """One build."""
        ...

    async def update(self, build_id: str, fields: dict[str, Any]) -> None:
        """Set fields of a build."""
        ...

    async def list(self, state: str | None, name: str | None, limit: int) -> list[BuildDoc]:
        """Builds, newest first."""
        ...

    async def add_chunk(self, build_id: str, seq: int, text: str) -> None:
        """Insert one log chunk (idempotent by build and seq)."""
        ...

    async def chunks(self, build_id: str, after: int, upto: int) -> list[tuple[int, str]]:
        """Chunks ``after < seq <= upto``, in order."""
        ...
