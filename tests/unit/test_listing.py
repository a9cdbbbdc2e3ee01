"""The machine list's in-memory index: paging, filters, and reloads racing local writes."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.listing import MachineIndex, matches


def _s(mid: str, **over) -> dict:
    return {"_id": mid, "app": "web", "state": "running", "host": "h1", "ip": None, **over}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({}, True),
        ({"app": "web", "state": "running"}, True),
        ({"app": "api"}, False),
        ({"_id": {"$in": ["m1", "m2"]}}, True),
        ({"_id": {"$in": ["m2"]}}, False),
        ({"_id": {"$gt": "m0"}}, True),
        ({"_id": {"$gt": "m1"}}, False),
        ({"ip": "10.0.0.1"}, False),
    ],
)
def test_matches_equality_and_in(filters, expected):
    assert matches(_s("m1"), filters) is expected


async def test_pages_in_id_order_after_the_cursor_with_filters():
    index = MachineIndex(refresh_s=60)
    docs = [_s(f"m{i}", app="db" if i % 3 == 0 else "web") for i in range(10)]
    await index.reload(lambda: asyncio.sleep(0, docs[::-1]))

    assert [d["_id"] for d in index.page({}, 3, None)] == ["m0", "m1", "m2"]
    assert [d["_id"] for d in index.page({}, 3, "m2")] == ["m3", "m4", "m5"]
    assert [d["_id"] for d in index.page({"app": "db"}, 10, "m0")] == ["m3", "m6", "m9"]
    assert index.page({}, 5, "m9") == []


async def test_a_write_during_a_reload_is_not_undone_by_its_older_snapshot():
    index = MachineIndex(refresh_s=60)
    await index.reload(lambda: asyncio.sleep(0, [_s("m1", state="creating")]))
    gate = asyncio.Event()

    async def slow_read() -> list[dict]:
        await gate.wait()
        return [_s("m1", state="creating"), _s("m2")]  # read before the local write landed

    reload = asyncio.create_task(index.reload(slow_read))
    await asyncio.sleep(0)
    index.put(_s("m1", state="running"))
    gate.set()
    await reload

    assert [(d["_id"], d["state"]) for d in index.page({}, 10, None)] == [
        ("m1", "running"),
        ("m2", "running"),
    ]


async def test_a_reload_is_due_only_after_the_interval_and_not_before_the_first():
    index = MachineIndex(refresh_s=3600)
    assert index.due() and not index.ready
    await index.reload(lambda: asyncio.sleep(0, []))
    assert index.ready and not index.due()
