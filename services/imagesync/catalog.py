"""What each dc's registry holds now: its catalog, each repository's tags and their digests.

Read from the registries (through the balancer of each dc, like the reconcile), never from
imagesync's own records, so an operator sees what a pull would find. A registry that does not
answer is listed as unreachable with the error, beside the others.

A listing costs one manifest HEAD per tag. The console refreshes its pages every few seconds
and several people may look at once, so a registry's answer for one prefix is kept for
``cache_s`` seconds (``DOCKVM_CATALOG_CACHE_S``) and shared; an unreachable registry is never
cached, so it is asked again at the next request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from libs.common.contracts.imagesync import CatalogRepo, CatalogTag, RegistryHoldings
from libs.common.errors import DomainError, TransientError

from .ports import Registry

__all__ = ["RegistryCatalog"]

# Manifest HEADs in flight per registry: enough to hide the round trips, few enough that a
# console refresh does not crowd out replication.
_HEADS = 8


async def _repo(reg: Registry, repo: str, sem: asyncio.Semaphore) -> CatalogRepo:
    async def head(tag: str) -> CatalogTag | None:
        async with sem:
            digest = await reg.manifest_digest(repo, tag)
        return None if digest is None else CatalogTag(tag=tag, digest=digest)

    found = await asyncio.gather(*(head(t) for t in sorted(await reg.tags(repo))))
    return CatalogRepo(repo=repo, tags=[t for t in found if t is not None])


class RegistryCatalog:
    """The registries' holdings, each (dc, prefix) answer kept for ``cache_s`` seconds."""

    def __init__(self, registries: Mapping[str, Registry], cache_s: float = 5.0) -> None:
        self._registries = registries
        self._cache_s = cache_s
        # (dc, prefix) -> (when it expires, repositories in catalog order, how many matched)
        self._kept: dict[tuple[str, str], tuple[float, list[CatalogRepo], int]] = {}

    async def holdings(
        self, *, dc: str | None, prefix: str | None, limit: int
    ) -> list[RegistryHoldings]:
        """Each registry's holdings (only ``dc``'s when given; none when the topology lacks it)."""
        # An unknown dc is an empty answer, not an error: an RPC handler's error has no reply,
        # so the caller would wait out its timeout; the gateway turns the empty answer into 404.
        regs = self._registries
        chosen = [] if dc is not None and dc not in regs else [dc] if dc else sorted(regs)
        return list(await asyncio.gather(*(self._one(d, prefix or "", limit) for d in chosen)))

    async def _one(self, dc: str, prefix: str, limit: int) -> RegistryHoldings:
        reg = self._registries[dc]
        kept = self._kept.get((dc, prefix))
        # Kept and fresh, and it read at least as many repositories as this request shows.
        fresh = kept is not None and kept[0] >= time.monotonic()
        if kept is None or not fresh or len(kept[1]) < min(limit, kept[2]):
            try:
                kept = await self._read(dc, reg, prefix, limit)
            except (TransientError, DomainError) as err:
                return RegistryHoldings(dc=dc, host=reg.host, reachable=False, error=str(err))
        _, repos, matched = kept
        return RegistryHoldings(
            dc=dc, host=reg.host, reachable=True, repositories=repos[:limit],
            truncated=matched > limit,
        )  # fmt: skip

    async def _read(
        self, dc: str, reg: Registry, prefix: str, limit: int
    ) -> tuple[float, list[CatalogRepo], int]:
        names = sorted(r for r in await reg.catalog() if r.startswith(prefix))
        sem = asyncio.Semaphore(_HEADS)
        repos = list(await asyncio.gather(*(_repo(reg, r, sem) for r in names[:limit])))
        kept = (time.monotonic() + self._cache_s, repos, len(names))
        if self._cache_s > 0:
            self._kept = {k: v for k, v in self._kept.items() if v[0] >= time.monotonic()}
            self._kept[(dc, prefix)] = kept
        return kept
