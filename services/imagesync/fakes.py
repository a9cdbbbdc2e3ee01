"""In-memory fakes of imagesync's ports, for unit tests of the replication logic.

They follow the real adapters' contract (tests/integration/test_imagesync_contract.py runs the
same checks against each fake and its real adapter, the registry client and the MongoDB blob
index): digests are verified, mounts need the blob in the other repository, uploads stream.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from libs.common.errors import NotFoundError, TransientError

from .adapters.registry import DigestMismatch
from .domain import Manifest, digest_of

__all__ = ["MemoryBlobIndex", "MemoryRegistry"]


@dataclass(slots=True)
class _Stream:
    size: int | None
    data: bytes
    chunk: int = 7

    async def chunks(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), self.chunk):
            yield self.data[i : i + self.chunk]


@dataclass
class MemoryRegistry:
    """A registry held in dicts; ``fail_next`` makes the next calls raise a transient error."""

    dc: str
    host: str = "memory"
    blobs: dict[str, bytes] = field(default_factory=dict)
    repo_blobs: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    manifests: dict[str, dict[str, Manifest]] = field(default_factory=lambda: defaultdict(dict))
    tag_map: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    fail_next: int = 0
    calls: list[str] = field(default_factory=list)

    def _tick(self, call: str) -> None:
        self.calls.append(call)
        if self.fail_next > 0:
            self.fail_next -= 1
            raise TransientError(f"{self.dc}: injected failure on {call}")

    def _resolve(self, repo: str, reference: str) -> str | None:
        if reference.startswith("sha256:"):
            return reference if reference in self.manifests.get(repo, {}) else None
        return self.tag_map.get(repo, {}).get(reference)

    async def manifest_digest(self, repo: str, reference: str) -> str | None:
        """The digest of ``reference`` or None."""
        self._tick("manifest_digest")
        return self._resolve(repo, reference)

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        """The stored manifest."""
        self._tick("get_manifest")
        digest = self._resolve(repo, reference)
        if digest is None:
            raise NotFoundError(f"{self.dc}: no manifest {repo}:{reference}")
        return self.manifests[repo][digest]

    async def put_manifest(self, repo: str, reference: str, manifest: Manifest) -> str:
        """Store a manifest whose references are all present."""
        self._tick("put_manifest")
        for d in manifest.blobs():
            if d.digest not in self.repo_blobs[repo]:
                raise NotFoundError(f"{self.dc}: blob unknown to {repo}: {d.digest}")
        for c in manifest.children():
            if c.digest not in self.manifests[repo]:
                raise NotFoundError(f"{self.dc}: manifest unknown to {repo}: {c.digest}")
        self.manifests[repo][manifest.digest] = manifest
        if not reference.startswith("sha256:"):
            self.tag_map[repo][reference] = manifest.digest
        return manifest.digest

    async def blob_exists(self, repo: str, digest: str) -> bool:
        """Whether ``repo`` links the blob."""
        self._tick("blob_exists")
        return digest in self.repo_blobs.get(repo, set())

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Link the blob if ``from_repo`` has it."""
        self._tick("mount_blob")
        if digest in self.repo_blobs.get(from_repo, set()):
            self.repo_blobs[repo].add(digest)
            return True
        return False

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: str) -> AsyncIterator[_Stream]:
        """Stream a linked blob in small chunks."""
        self._tick("open_blob")
        if digest not in self.repo_blobs.get(repo, set()):
            raise NotFoundError(f"{self.dc}: no blob {repo}@{digest}")
        data = self.blobs[digest]
        yield _Stream(len(data), data)

    async def upload_blob(
        self, repo: str, digest: str, chunks: AsyncIterator[bytes], size: int | None = None
    ) -> int:
        """Take the chunks; refuse them unless they hash to ``digest``."""
        self._tick("upload_blob")
        hasher, parts = hashlib.sha256(), []
        async for chunk in chunks:
            hasher.update(chunk)
            parts.append(chunk)
        if "sha256:" + hasher.hexdigest() != digest:
            raise DigestMismatch(f"{self.dc}: upload does not hash to {digest}")
        data = b"".join(parts)
        self.blobs[digest] = data
        self.repo_blobs[repo].add(digest)
        return len(data)

    async def catalog(self) -> list[str]:
        """Repositories with at least one manifest."""
        self._tick("catalog")
        return sorted(r for r, m in self.manifests.items() if m)

    async def tags(self, repo: str) -> list[str]:
        """Tags of ``repo``."""
        self._tick("tags")
        return sorted(self.tag_map.get(repo, {}))

    # --- test helpers -------------------------------------------------------------------

    def add_blob(self, repo: str, data: bytes) -> str:
        """Store ``data`` in ``repo``; return its digest."""
        digest = digest_of(data)
        self.blobs[digest] = data
        self.repo_blobs[repo].add(digest)
        return digest

    def add_manifest(self, repo: str, manifest: Manifest, tag: str | None = None) -> str:
        """Store a manifest (by digest, and under ``tag``)."""
        self.manifests[repo][manifest.digest] = manifest
        if tag:
            self.tag_map[repo][tag] = manifest.digest
        return manifest.digest


@dataclass
class MemoryBlobIndex:
    """:class:`~services.imagesync.ports.BlobIndex` in a dict."""

    repos: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))

    async def where(self, dc: str, digest: str) -> list[str]:
        """Known repositories holding the blob."""
        return list(self.repos.get((dc, digest), []))

    async def add(self, dc: str, digest: str, repo: str) -> None:
        """Remember a holder."""
        if repo not in self.repos[(dc, digest)]:
            self.repos[(dc, digest)].append(repo)
