"""The store on the real database caps a machine's transitions as its twin does."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.gateway.fakes import MemoryGatewayStore
from services.gateway.store import GatewayStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["memory", "mongo"])
async def store(request, mongo_db):
    """The in-memory twin and the store on the real database, keeping 10 transitions."""
    if request.param == "memory":
        s = MemoryGatewayStore(transitions_kept=10)
    else:
        s = GatewayStore(mongo_db, transitions_kept=10)
    await s.setup()
    return s


async def test_a_flapping_machine_keeps_its_first_and_latest_transitions(store):
    await store.insert_machines(
        [
            {
                "_id": "m1",
                "type": "docker",
                "app": "web",
                "image": "i",
                "cpus": 1.0,
                "memory": 1,
                "disk": 1,
                "dc": "dc1",
                "vlan_id": 1,
                "hostname": "m1",
                "state": "running",
                "host": "h1",
                "ip": None,
                "created_at": T0,
                "updated_at": T0,
                "saga": None,
                "transitions": [{"state": "requested", "at": T0, "reason": None}],
            }
        ]
    )
    for i in range(8):
        await store.transition("m1", ["running"], "stopped", reason=f"stop {i}")
        moved = await store.transition("m1", ["stopped"], "running", reason=f"start {i}")
    stored = await store.get("m1")

    assert [t["reason"] for t in stored["transitions"]] == [
        None,
        *(f"{verb} {i}" for i in range(3, 8) for verb in ("stop", "start")),
    ]
    assert moved["transitions"] == stored["transitions"]
