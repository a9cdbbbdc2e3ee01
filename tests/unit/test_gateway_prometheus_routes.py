"""The discovery and alert routes on an aiohttp test server with a stub store: the monitoring
credential only, and one audit entry per alert and state whatever Alertmanager repeats."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from libs.common.errors import ConflictError
from services.gateway.api.deps import SETTINGS, STORE
from services.gateway.api.prometheus import PROMETHEUS, alerts, targets
from services.gateway.settings import GatewaySettings

SECRET = "monitoring-secret"
ALERT = {"status": "firing", "labels": {"alertname": "MachineOomKilled", "machine_id": "m-1"},
         "annotations": {"summary": "oom"}, "startsAt": "2026-11-29T12:00:00Z",
         "fingerprint": "f1"}  # fmt: skip


class _Store:
    index = None

    def __init__(self) -> None:
        self.audit: dict[str, dict[str, Any]] = {}

    async def audit_write(self, entry: dict[str, Any]) -> None:
        if entry["_id"] in self.audit:
            raise ConflictError("duplicate key")
        self.audit[entry["_id"]] = entry

    async def list_hosts(self) -> list[dict[str, Any]]:
        return [{"_id": "h1", "dc": "dc1", "labels": {}}]

    async def find(self, filters: dict[str, Any], limit: int) -> list[dict[str, Any]]:
        return [{"_id": "m-1", "dc": "dc1", "host": "h1", "app": "web", "ip": "10.0.0.5"}]


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[tuple[TestClient, _Store]]:
    secret = tmp_path / "gateway.secret"
    secret.write_text(SECRET + "\n")
    store = _Store()
    app = web.Application()
    app[STORE] = store  # type: ignore[assignment]
    app[SETTINGS] = GatewaySettings(prometheus_secret_file=secret, state_dir=tmp_path)
    app[PROMETHEUS] = None  # type: ignore[assignment]
    app.router.add_get("/v1/prometheus/targets", targets)
    app.router.add_post("/v1/prometheus/alerts", alerts)
    async with TestClient(TestServer(app)) as c:
        yield c, store


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_alerts_are_written_once_per_alert_and_state(client):
    c, store = client
    note = {"alerts": [ALERT]}
    first = await c.post("/v1/prometheus/alerts", json=note, headers=_auth(SECRET))
    again = await c.post("/v1/prometheus/alerts", json=note, headers=_auth(SECRET))
    resolved = {**ALERT, "status": "resolved", "endsAt": "2026-11-29T12:05:00Z"}
    await c.post("/v1/prometheus/alerts", json={"alerts": [resolved]}, headers=_auth(SECRET))
    assert (await first.json(), await again.json()) == (
        {"received": 1, "written": 1}, {"received": 1, "written": 0}
    )
    assert sorted(e["event"] for e in store.audit.values()) == ["alert.firing", "alert.resolved"]
    assert {e["target"] for e in store.audit.values()} == {"m-1"}


@pytest.mark.parametrize("headers", [{}, _auth("dvm_an-admin-token"), _auth(SECRET + "x")])
async def test_anything_but_the_monitoring_credential_is_refused(client, headers):
    c, store = client
    got = await c.get("/v1/prometheus/targets", headers=headers)
    posted = await c.post("/v1/prometheus/alerts", json={"alerts": [ALERT]}, headers=headers)
    assert (got.status, posted.status, store.audit) == (401, 401, {})


async def test_discovery_answers_http_sd_groups(client):
    c, _ = client
    r = await c.get("/v1/prometheus/targets", headers=_auth(SECRET))
    groups = await r.json()
    assert r.status == 200
    assert {"targets": ["10.0.0.5:9100"], "labels": {
        "dc": "dc1", "host": "h1", "app": "web", "ip": "10.0.0.5", "machine_id": "m-1"}} in groups
    assert {"targets": ["127.0.0.1:9104"], "labels": {
        "dc": "dc1", "host": "h1", "app": "monitor"}} in groups


async def test_a_body_that_is_not_a_notification_is_a_400(client):
    c, store = client
    r = await c.post("/v1/prometheus/alerts", json={"nope": 1}, headers=_auth(SECRET))
    assert (r.status, store.audit) == (400, {})
