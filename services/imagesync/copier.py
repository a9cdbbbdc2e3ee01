"""Copy one tagged image between two registries, through the :class:`Registry` port.

Order of work, so a reader of the target never sees a manifest whose content is missing:
blobs first (HEAD → skip, known in another repository → mount, else stream GET → upload with
its digest checked), then child manifests by digest, then the tagged manifest last. Every
step is idempotent, so an attempt that failed half-way is simply run again.
"""

from __future__ import annotations

import asyncio

import structlog
from prometheus_client import Counter

from libs.common.errors import DomainError

from .domain import Descriptor, Manifest, SyncStats
from .ports import BlobIndex, Registry

__all__ = ["Copier"]

log = structlog.get_logger("imagesync.copier")
_BYTES = Counter("dockvm_imagesync_bytes_copied_total", "Blob bytes streamed", ["target"])
_BLOBS = Counter("dockvm_imagesync_blobs_total", "Blobs handled by outcome", ["target", "how"])


class Copier:
    """Copies images; ``blob_concurrency`` bounds the blobs in flight per image."""

    def __init__(self, index: BlobIndex, blob_concurrency: int = 4) -> None:
        self._index = index
        self._blob_concurrency = blob_concurrency

    async def copy(
        self,
        src: Registry,
        dst: Registry,
        repo: str,
        tag: str,
        digest: str,
        stats: SyncStats,
    ) -> SyncStats:
        """Make ``dst`` serve ``repo:tag`` at ``digest`` as ``src`` does; fill ``stats``."""
        if await dst.manifest_digest(repo, tag) == digest:
            stats.already_present = True
            return stats
        top = await src.get_manifest(repo, digest)
        sem = asyncio.Semaphore(self._blob_concurrency)
        learned: list[tuple[str, str]] = []
        try:
            if top.is_index:
                for child in top.children():
                    await self._copy_child(src, dst, repo, child, sem, stats, learned)
            else:
                await self._copy_blobs(src, dst, repo, top, sem, stats, learned)
            # A newer push of the tag may have landed while we copied: never roll it back.
            if await src.manifest_digest(repo, tag) != digest:
                stats.superseded = True
                return stats
            await dst.put_manifest(repo, tag, top)
            stats.manifests_put += 1
            return stats
        finally:
            # Where blobs live only serves later mounts: record it off the copy's critical path.
            for dc, blob in learned:
                await self._index.add(dc, blob, repo)

    async def _copy_child(
        self,
        src: Registry,
        dst: Registry,
        repo: str,
        child: Descriptor,
        sem: asyncio.Semaphore,
        stats: SyncStats,
        learned: list[tuple[str, str]],
    ) -> None:
        if await dst.manifest_digest(repo, child.digest) == child.digest:
            return
        manifest = await src.get_manifest(repo, child.digest)
        if manifest.is_index:
            raise DomainError(
                f"{repo}@{child.digest}: nested indexes are not copied", reason="nested_index"
            )
        await self._copy_blobs(src, dst, repo, manifest, sem, stats, learned)
        await dst.put_manifest(repo, child.digest, manifest)
        stats.manifests_put += 1

    async def _copy_blobs(
        self,
        src: Registry,
        dst: Registry,
        repo: str,
        manifest: Manifest,
        sem: asyncio.Semaphore,
        stats: SyncStats,
        learned: list[tuple[str, str]],
    ) -> None:
        async def one(desc: Descriptor) -> None:
            async with sem:
                await self._copy_blob(src, dst, repo, desc, stats, learned)

        try:
            async with asyncio.TaskGroup() as tg:
                # Largest first, so the longest transfer never starts last.
                for desc in sorted(manifest.blobs(), key=lambda d: -d.size):
                    tg.create_task(one(desc))
        except BaseExceptionGroup as group:
            # Callers (and tenacity) classify one error, not a group: surface the first.
            raise _first_leaf(group) from None

    async def _copy_blob(
        self,
        src: Registry,
        dst: Registry,
        repo: str,
        desc: Descriptor,
        stats: SyncStats,
        learned: list[tuple[str, str]],
    ) -> None:
        learned.append((src.dc, desc.digest))
        if await dst.blob_exists(repo, desc.digest):
            stats.blobs_skipped += 1
            _BLOBS.labels(dst.dc, "skipped").inc()
            return
        for other in await self._index.where(dst.dc, desc.digest):
            if other != repo and await dst.mount_blob(repo, desc.digest, other):
                stats.blobs_mounted += 1
                _BLOBS.labels(dst.dc, "mounted").inc()
                learned.append((dst.dc, desc.digest))
                return
        async with src.open_blob(repo, desc.digest) as stream:
            sent = await dst.upload_blob(repo, desc.digest, stream.chunks(), desc.size or None)
        stats.bytes_copied += sent
        stats.blobs_copied += 1
        _BYTES.labels(dst.dc).inc(sent)
        _BLOBS.labels(dst.dc, "copied").inc()
        learned.append((dst.dc, desc.digest))


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    err: BaseException = group
    while isinstance(err, BaseExceptionGroup):
        err = err.exceptions[0]
    return err
