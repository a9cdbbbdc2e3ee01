"""A machine's transitions are capped: its first and its latest N are kept."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from services.gateway.fakes import MemoryGatewayStore
from services.gateway.settings import GatewaySettings
from services.gateway.store import TRANSITIONS_KEPT, capped_transitions

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _entries(n: int) -> list[dict]:
    return [{"state": f"s{i}", "at": T0 + timedelta(seconds=i), "reason": None} for i in range(n)]


@pytest.mark.parametrize("n", [0, 1, 4, 5])
def test_a_list_within_the_cap_is_left_alone(n):
    assert capped_transitions(_entries(n), kept=4) is None


def test_a_longer_list_keeps_the_first_and_the_last_n():
    capped = capped_transitions(_entries(12), kept=4)

    assert [t["state"] for t in capped] == ["s0", "s8", "s9", "s10", "s11"]


def test_the_default_and_the_setting(monkeypatch):
    assert GatewaySettings().transitions_kept == TRANSITIONS_KEPT == 50
    monkeypatch.setenv("DOCKVM_TRANSITIONS_KEPT", "12")
    assert GatewaySettings().transitions_kept == 12
    with pytest.raises(ValidationError):
        GatewaySettings(transitions_kept=3)  # a failed create's whole path would not fit


async def test_a_machine_that_flaps_keeps_its_first_and_latest_transitions():
    store = MemoryGatewayStore(transitions_kept=10)
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
    for i in range(30):
        await store.transition("m1", ["running"], "stopped", reason=f"stop {i}")
        await store.transition("m1", ["stopped"], "running", reason=f"start {i}")
    doc = await store.get("m1")

    assert len(doc["transitions"]) == 11
    assert doc["transitions"][0]["state"] == "requested"
    assert doc["transitions"][-1]["reason"] == "start 29"
    assert doc["transitions"][1]["reason"] == "stop 25"
