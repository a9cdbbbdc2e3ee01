"""The builder's store contract, run against the in-memory fake and the real MongoDB store from
one ``params`` list, so that the fake cannot drift from what FerretDB does."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from libs.common.clock import utcnow
from services.builder.fakes import MemoryBuildStore
from services.builder.store import MongoBuildStore

pytestmark = pytest.mark.integration


@pytest.fixture(params=["memory", "mongo"])
def store(request: pytest.FixtureRequest, mongo_db: Any) -> Any:
    return MemoryBuildStore() if request.param == "memory" else MongoBuildStore(mongo_db)


def _doc(build_id: str, name: str = "team/web", age_s: int = 0, state: str = "queued") -> Any:
    return {"_id": build_id, "name": name, "tag": "1", "state": state, "spec": "{}",
            "created_at": utcnow() - timedelta(seconds=age_s), "log_seq": 0}  # fmt: skip


async def test_insert_is_idempotent_by_id_and_returns_what_is_stored(store: Any):
    first = await store.insert(_doc("b-1"))
    await store.update("b-1", {"state": "running"})

    again = await store.insert(_doc("b-1"))

    assert first["state"] == "queued" and again["state"] == "running"


async def test_listing_is_newest_first_and_filtered(store: Any):
    await store.insert(_doc("b-old", age_s=60, state="succeeded"))
    await store.insert(_doc("b-new", state="succeeded"))
    await store.insert(_doc("b-other", name="team/db"))

    everything = [d["_id"] for d in await store.list(None, None, 10)]
    done = [d["_id"] for d in await store.list("succeeded", "team/web", 1)]

    assert everything == ["b-other", "b-new", "b-old"] and done == ["b-new"]


async def test_chunks_are_counted_on_the_build_and_read_in_order(store: Any):
    await store.insert(_doc("b-1"))
    for seq, text in ((1, "a"), (2, "b"), (3, "c")):
        await store.add_chunk("b-1", seq, text)
    await store.add_chunk("b-1", 2, "again")  # a retried write changes nothing

    doc = await store.get("b-1")

    assert doc["log_seq"] == 3  # a retried earlier chunk does not move the count back
    assert await store.chunks("b-1", 0, 3) == [(1, "a"), (2, "b"), (3, "c")]
    assert await store.chunks("b-1", 1, 2) == [(2, "b")]
    assert await store.chunks("b-1", 3, 3) == []
