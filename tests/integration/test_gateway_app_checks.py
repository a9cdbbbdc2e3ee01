"""The declared health checks: the in-memory twin and the store on the real database alike."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.app_checks import AppCheckStore
from services.gateway.fakes import MemoryAppChecks

SMOKE = {"type": "cmd", "target": "/usr/local/bin/smoke", "timeout_s": 20.0}
HTTP = {"type": "http", "target": "8000/health", "timeout_s": 5.0}


@pytest.fixture(params=["memory", "mongo"])
def checks(request, mongo_db):
    return MemoryAppChecks() if request.param == "memory" else AppCheckStore(mongo_db)


async def test_a_declaration_is_found_by_app_and_name_only(checks):
    await checks.declare("web", "smoke", SMOKE, by="ops")
    await checks.declare("web", "http", HTTP, by="ops")
    await checks.declare("api", "smoke", HTTP, by="admin")

    found = await checks.app_check("web", "smoke")
    listed = await checks.app_checks("web")

    assert {k: found[k] for k in SMOKE} == SMOKE
    assert found["declared_by"] == "ops"
    assert await checks.app_check("web", "nope") is None
    assert [(c["name"], c["type"]) for c in listed] == [("http", "http"), ("smoke", "cmd")]


async def test_the_last_declaration_wins_even_when_two_race(checks):
    await asyncio.gather(
        checks.declare("web", "smoke", SMOKE, by="a"), checks.declare("web", "smoke", HTTP, by="b")
    )
    await checks.declare("web", "smoke", {**SMOKE, "target": "/bin/true"}, by="c")

    found = await checks.app_check("web", "smoke")

    assert (found["target"], found["declared_by"]) == ("/bin/true", "c")
    assert len(await checks.app_checks("web")) == 1


async def test_a_withdrawn_check_is_gone_and_withdrawing_twice_says_so(checks):
    await checks.declare("web", "smoke", SMOKE, by="ops")

    first, second = await checks.withdraw("web", "smoke"), await checks.withdraw("web", "smoke")

    assert (first, second) == (True, False)
    assert await checks.app_check("web", "smoke") is None
