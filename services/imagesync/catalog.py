"""What each dc's registry holds now: its catalog, each repository's tags and their digests.

Read from the registries (through the balancer of each dc, like the reconcile), never from
imagesync's own records, so an operator sees what a pull would find. A registry that does not
answer is listed as unreachable with the error, beside the others.

A listing costs one manifest HEAD per tag. The console refreshes its pages every few seconds
and several people may look at once, so a registry's answer for one prefix is kept for
``cache_s`` seconds (``DOCKVM_CATALOG_CACHE_S``) and shared; an unreachable registry is never
cached, so it is asked again at the next request.

The repository names cost more: Distribution answers ``/v2/_catalog`` by walking its storage,
and on S3 (Ceph's RADOS Gateway) that is a listing per directory, about 3 s for 44 repositories
on a quiet host and growing with each one. :class:`RepositoryNames` walks a registry at most once
at a time (a caller that arrives during a walk shares it, the reconcile's walk included), keeps
the names ``DOCKVM_CATALOG_NAMES_S`` seconds, and adds a repository at once when a push or a copy
into it is seen on the bus. Tags and digests are still read for each listing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from libs.common.contracts.imagesync import CatalogRepo, CatalogTag, RegistryHoldings
from libs.common.errors import DomainError, TransientError

from .ports import Registry

__all__ = ["RegistryCatalog", "RepositoryNames"]

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


class RepositoryNames:
    """Each registry's repository names: one walk at a time, kept ``max_age_s``, told of pushes."""

    def __init__(self, registries: Mapping[str, Registry], max_age_s: float = 0.0) -> None:
        self._registries = registries
        self._max_age_s = max_age_s
        self._walks: dict[str, asyncio.Future[set[str]]] = {}
        # dc -> (when walked, names); dc -> {repository: when learned} since the last walk began
        self._kept: dict[str, tuple[float, set[str]]] = {}
        self._learned: dict[str, dict[str, float]] = {}

    async def names(self, dc: str) -> list[str]:
        """``dc``'s repositories, walked again when the kept ones are older than ``max_age_s``."""
        kept = self._kept.get(dc)
        if kept is not None and time.monotonic() - kept[0] < self._max_age_s:
            return sorted(kept[1])
        return await self.walk(dc)

    async def walk(self, dc: str) -> list[str]:
        """Walk ``dc``'s catalog now, or share the walk already under way."""
        running = self._walks.get(dc)
        if running is None:
            running = asyncio.ensure_future(self._walk(dc))
            self._walks[dc] = running
            running.add_done_callback(lambda _: self._walks.pop(dc, None))
        # Shielded: a caller that gives up (its RPC timed out) does not cancel the others' walk.
        return sorted(await asyncio.shield(running))

    def learn(self, dc: str, repo: str) -> None:
        """``repo`` of ``dc`` was just written: list it before the next walk finds it."""
        now = time.monotonic()
        self._learned.setdefault(dc, {})[repo] = now
        if dc in self._kept:
            self._kept[dc][1].add(repo)

    async def _walk(self, dc: str) -> set[str]:
        began = time.monotonic()
        walked = set(await self._registries[dc].catalog())
        # A push learned while the walk ran may be missing from what it read: keep it.
        since = {r: t for r, t in self._learned.get(dc, {}).items() if t >= began}
        self._learned[dc] = since
        self._kept[dc] = (began, walked | set(since))
        return self._kept[dc][1]


class RegistryCatalog:
    """The registries' holdings, each (dc, prefix) answer kept for ``cache_s`` seconds."""

    def __init__(
        self,
        registries: Mapping[str, Registry],
        cache_s: float = 5.0,
        names: RepositoryNames | None = None,
    ) -> None:
        self._registries = registries
        self._cache_s = cache_s
        self._names = names or RepositoryNames(registries)
        # (dc, prefix) -> (when it expires, repositories in catalog order, how many matched)
        self._kept: dict[tuple[str, str], tuple[float, list[CatalogRepo], int]] = {}

    async def holdings(
        self, *, dc: str | None, prefix: str | None, limit: int
    ) -> list[RegistryHoldings]:
        """Each registry's holdings (only ``dc``'s when given; none when the topology lacks it)."""
        # An unknown dc is an empty answer (a listing of no registry); the gateway says 404.
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
        names = [r for r in await self._names.names(dc) if r.startswith(prefix)]
        sem = asyncio.Semaphore(_HEADS)
        repos = list(await asyncio.gather(*(_repo(reg, r, sem) for r in names[:limit])))
        kept = (time.monotonic() + self._cache_s, repos, len(names))
        if self._cache_s > 0:
            self._kept = {k: v for k, v in self._kept.items() if v[0] >= time.monotonic()}
            self._kept[(dc, prefix)] = kept
        return kept
