"""The registries' holdings as imagesync lists them (the in-memory registry; the real ones in
tests/integration/test_imagesync.py): filters, limits, an unreachable registry, and the short
cache that several console pages share."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from libs.common.errors import TransientError
from services.imagesync.catalog import RegistryCatalog, RepositoryNames
from services.imagesync.fakes import MemoryRegistry


def _registry(dc: str, repos: dict[str, dict[str, str]]) -> MemoryRegistry:
    reg = MemoryRegistry(dc=dc, host=f"{dc}.example:5000")
    for repo, tags in repos.items():
        for tag, digest in tags.items():
            reg.manifests[repo][digest] = object()  # type: ignore[assignment]
            reg.tag_map[repo][tag] = digest
    return reg


def _digest(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def _held(found: Any) -> dict[str, list[tuple[str, str, str]]]:
    return {h.dc: [(r.repo, t.tag, t.digest) for r in h.repositories for t in r.tags]
            for h in found}  # fmt: skip


async def test_each_registry_lists_its_repositories_tags_and_digests_under_a_prefix():
    dc1 = _registry("dc1", {"team/web": {"v1": _digest(1), "v2": _digest(2)},
                            "other/db": {"v1": _digest(3)}})  # fmt: skip
    dc2 = _registry("dc2", {"team/web": {"v1": _digest(1)}})
    catalog = RegistryCatalog({"dc1": dc1, "dc2": dc2}, cache_s=0)

    found = await catalog.holdings(dc=None, prefix="team/", limit=100)
    only_dc2 = await catalog.holdings(dc="dc2", prefix=None, limit=100)

    assert _held(found) == {
        "dc1": [("team/web", "v1", _digest(1)), ("team/web", "v2", _digest(2))],
        "dc2": [("team/web", "v1", _digest(1))],
    }
    assert [(h.dc, h.host, h.reachable) for h in found] == [
        ("dc1", "dc1.example:5000", True), ("dc2", "dc2.example:5000", True)]  # fmt: skip
    assert _held(only_dc2) == {"dc2": [("team/web", "v1", _digest(1))]}


async def test_an_unknown_dc_is_an_empty_answer_and_a_limit_truncates_in_catalog_order():
    dc1 = _registry("dc1", {f"r/{i}": {"t": _digest(i)} for i in range(5)})
    catalog = RegistryCatalog({"dc1": dc1}, cache_s=0)

    unknown = await catalog.holdings(dc="dc9", prefix=None, limit=10)
    [two] = await catalog.holdings(dc=None, prefix=None, limit=2)

    assert unknown == []
    assert [r.repo for r in two.repositories] == ["r/0", "r/1"]
    assert two.truncated


async def test_an_unreachable_registry_is_named_and_never_cached():
    dc1 = _registry("dc1", {"a/b": {"v1": _digest(1)}})
    catalog = RegistryCatalog({"dc1": dc1}, cache_s=60)

    dc1.fail_next = 1
    [down] = await catalog.holdings(dc=None, prefix=None, limit=10)
    [back] = await catalog.holdings(dc=None, prefix=None, limit=10)

    assert (down.reachable, down.repositories) == (False, [])
    assert down.error and "injected failure" in down.error
    assert back.reachable and _held([back]) == {"dc1": [("a/b", "v1", _digest(1))]}


async def test_an_answer_is_shared_for_its_window_and_a_wider_limit_reads_again():
    dc1 = _registry("dc1", {f"r/{i}": {"t": _digest(i)} for i in range(3)})
    catalog = RegistryCatalog({"dc1": dc1}, cache_s=60)

    await catalog.holdings(dc=None, prefix=None, limit=2)
    reads = len(dc1.calls)
    [again] = await catalog.holdings(dc=None, prefix=None, limit=1)
    shared = len(dc1.calls) - reads
    [wider] = await catalog.holdings(dc=None, prefix=None, limit=3)
    other_prefix = await catalog.holdings(dc=None, prefix="r/1", limit=3)

    assert shared == 0  # the second page view asked the registry nothing
    assert [r.repo for r in again.repositories] == ["r/0"] and again.truncated
    assert [r.repo for r in wider.repositories] == ["r/0", "r/1", "r/2"] and not wider.truncated
    assert _held(other_prefix) == {"dc1": [("r/1", "t", _digest(1))]}


class _SlowCatalog(MemoryRegistry):
    """The in-memory registry whose catalog walk waits until the test lets it finish."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.walking = asyncio.Event()
        self.finish = asyncio.Event()

    async def catalog(self) -> list[str]:
        names = await super().catalog()
        self.walking.set()
        await self.finish.wait()
        return names


async def test_callers_during_a_walk_share_it_and_a_push_during_it_is_kept():
    reg = _SlowCatalog(dc="dc1", host="dc1.example:5000")
    reg.manifests["a/old"][_digest(1)] = object()  # type: ignore[assignment]
    names = RepositoryNames({"dc1": reg}, max_age_s=60)

    first = asyncio.create_task(names.walk("dc1"))
    await reg.walking.wait()
    second = asyncio.create_task(names.names("dc1"))
    names.learn("dc1", "b/pushed")  # a push seen on the bus while the walk is reading
    reg.finish.set()
    walked, shared = await first, await second
    kept = await names.names("dc1")

    assert reg.calls.count("catalog") == 1
    assert walked == shared == kept == ["a/old", "b/pushed"]


async def test_names_are_kept_for_their_age_and_a_push_is_listed_without_a_walk():
    reg = _registry("dc1", {"a/b": {"v1": _digest(1)}})
    names = RepositoryNames({"dc1": reg}, max_age_s=60)
    stale = RepositoryNames({"dc1": reg}, max_age_s=0)

    await names.names("dc1")
    names.learn("dc1", "c/new")
    listed = await names.names("dc1")
    walks = reg.calls.count("catalog")
    await stale.names("dc1")
    await stale.names("dc1")

    assert listed == ["a/b", "c/new"] and walks == 1
    assert reg.calls.count("catalog") == walks + 2  # max_age_s=0 walks every time


async def test_a_failed_walk_reaches_its_callers_and_the_next_call_walks_again():
    reg = _registry("dc1", {"a/b": {"v1": _digest(1)}})
    names = RepositoryNames({"dc1": reg}, max_age_s=60)

    reg.fail_next = 1
    with pytest.raises(TransientError):
        await names.names("dc1")
    again = await names.names("dc1")

    assert again == ["a/b"]
    assert reg.calls.count("catalog") == 2
