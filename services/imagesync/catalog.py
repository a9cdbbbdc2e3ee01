"""What each dc's registry holds now: its catalog, each repository's tags and their digests.

Read live from the registries (through the balancer of each dc, like the reconcile), never from
imagesync's own records, so an operator sees what a pull would find. A registry that does not
answer is listed as unreachable with the error, beside the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from libs.common.contracts.imagesync import CatalogRepo, CatalogTag, RegistryHoldings
from libs.common.errors import DomainError, TransientError

from .ports import Registry

__all__ = ["holdings"]

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


async def _one(dc: str, reg: Registry, prefix: str, limit: int) -> RegistryHoldings:
    try:
        names = sorted(r for r in await reg.catalog() if r.startswith(prefix))
        sem = asyncio.Semaphore(_HEADS)
        repos = await asyncio.gather(*(_repo(reg, r, sem) for r in names[:limit]))
    except (TransientError, DomainError) as err:
        return RegistryHoldings(dc=dc, host=reg.host, reachable=False, error=str(err))
    return RegistryHoldings(
        dc=dc, host=reg.host, reachable=True, repositories=list(repos), truncated=len(names) > limit
    )


async def holdings(
    registries: Mapping[str, Registry], *, dc: str | None, prefix: str | None, limit: int
) -> list[RegistryHoldings]:
    """Each registry's holdings (only ``dc``'s when given; none when the topology lacks it)."""
    # An unknown dc is an empty answer, not an error: an RPC handler's error has no reply, so
    # the caller would wait out its timeout; the gateway turns the empty answer into a 404.
    chosen = [] if dc is not None and dc not in registries else [dc] if dc else sorted(registries)
    return list(
        await asyncio.gather(*(_one(d, registries[d], prefix or "", limit) for d in chosen))
    )
