"""``POST /v1/apps/{app}/scale`` in an in-memory aiohttp app on loopback: a scale-in names every
machine it could not scale in, and why, instead of skipping it; a resize that finds its machine
gone answers 404, not 500."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from libs.common.errors import ConflictError, NotFoundError, TransientError
from services.gateway.api import GatewayState, build_api, problem_middleware
from services.gateway.settings import GatewaySettings

APP = {"_id": "web", "spec": {"app": "web"}}
# Ids sort by creation time: m4 is the newest.
ACTIVE = [{"_id": f"m{i}", "app": "web", "state": "running"} for i in range(1, 5)]


class _Store:
    """What the routes read: an admin token, the audit log, one app with four machines."""

    def __init__(self) -> None:
        self.audit: list[dict[str, Any]] = []
        self.machines: dict[str, dict[str, Any]] = {}

    async def token_by_secret(self, token: str) -> dict[str, Any] | None:
        return {"name": "admin", "role": "admin"} if token == "t-admin" else None

    async def audit_write(self, entry: dict[str, Any]) -> None:
        self.audit.append(entry)

    async def get_app(self, name: str) -> dict[str, Any] | None:
        return APP if name == "web" else None

    async def app_machines(self, name: str) -> list[dict[str, Any]]:
        return list(ACTIVE)

    async def get(self, machine_id: str) -> dict[str, Any] | None:
        return self.machines.get(machine_id)


class _Driver:
    """Begins destroys; the machines named in ``refuse`` raise what they map to."""

    def __init__(self, refuse: dict[str, Exception]) -> None:
        self.refuse = refuse
        self.destroyed: list[str] = []

    async def begin_destroy(self, machine_id: str) -> dict[str, Any]:
        if machine_id in self.refuse:
            raise self.refuse[machine_id]
        self.destroyed.append(machine_id)
        return {"_id": machine_id, "state": "destroying"}

    async def begin_resize(self, *args: Any) -> tuple[dict[str, Any], str]:
        return {}, "op1"

    async def wait_op(self, machine_id: str, op_id: str, timeout: float) -> dict[str, Any]:
        return {"op_id": op_id, "ok": True}


@pytest.fixture
def driver() -> _Driver:
    return _Driver(
        {
            "m4": ConflictError("m4 is busy with create", reason="machine_busy"),
            "m2": TransientError("database unavailable"),
        }
    )


@pytest.fixture
async def client(driver: _Driver) -> AsyncIterator[TestClient]:
    state = GatewayState(store=_Store(), driver=driver, rpc=None, settings=GatewaySettings())  # type: ignore[arg-type]
    app = web.Application(middlewares=[problem_middleware])
    build_api(state).mount(app)
    async with TestClient(
        TestServer(app, host="127.0.0.1"), headers={"Authorization": "Bearer t-admin"}
    ) as c:
        yield c


async def test_a_scale_in_names_each_machine_it_could_not_scale_in_and_why(client, driver):
    resp = await client.post("/v1/apps/web/scale", json={"count": 1})
    body = await resp.json()

    assert resp.status == 200
    assert body["destroying"] == ["m3"] == driver.destroyed  # m4, m3, m2 chosen, newest first
    assert [(f["id"], f["reason"]) for f in body["failed"]] == [
        ("m4", "machine_busy"),
        ("m2", "unavailable"),
    ]
    assert "busy with create" in body["failed"][0]["detail"]


async def test_a_scale_in_with_nothing_refused_reports_no_failure(client, driver):
    driver.refuse.clear()

    resp = await client.post("/v1/apps/web/scale", json={"count": 2, "ids": ["m1"]})
    body = await resp.json()

    assert (resp.status, body["destroying"], body["failed"]) == (200, ["m1", "m4"], [])


async def test_a_machine_gone_before_its_scale_in_is_reported_not_skipped(client, driver):
    driver.refuse = {"m4": NotFoundError("no machine m4", reason="machine_not_found")}

    resp = await client.post("/v1/apps/web/scale", json={"count": 3})
    body = await resp.json()

    assert body["destroying"] == []
    assert body["failed"] == [
        {"id": "m4", "reason": "machine_not_found", "detail": "no machine m4"}
    ]


async def test_a_resize_whose_machine_is_destroyed_meanwhile_is_404_not_500(client):
    resp = await client.patch("/v1/machines/m9", json={"cpus": 2})
    body = await resp.json()

    assert resp.status == 404 and body["reason"] == "machine_not_found"
    assert "destroyed meanwhile" in body["detail"]
