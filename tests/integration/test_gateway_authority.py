"""Authority on the real gateway: declared health checks, and tokens scoped to some apps.

The gateway runs as a subprocess on the real RabbitMQ and MongoDB API; its peers (ipam, the
hosts) are played by :class:`~tests.integration.test_gateway.Peers`, and the deploys it sends
are read off the bus. The local Maven repository (``scripts/maven-repo.sh``) serves the artifact.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.integration.test_gateway import (  # noqa: F401 - fixtures
    _create,
    api,
    gateway,
    peers,
)
from tests.integration.test_gateway_cli import _cli

RELEASE = {"app": "web", "group_id": "com.example", "artifact_id": "demo-app",
           "version": "1.0.0", "batch_size": 1}
SMOKE = {"type": "cmd", "target": "/usr/local/bin/smoke --quick", "timeout_s": 20}
# A check as the gateway hands it on: every field, the ones left out at their defaults.
SMOKE_SENT = {**SMOKE, "fail_after": None}


async def _token(admin: aiohttp.ClientSession, role: str, apps: list[str] | None = None) -> str:
    body: dict[str, Any] = {"name": f"{role}-bot", "role": role}
    if apps is not None:
        body["apps"] = apps
    async with admin.post("/v1/tokens", json=body) as r:
        assert r.status == 201, await r.text()
        return (await r.json())["token"]


def _as(admin: aiohttp.ClientSession, token: str) -> aiohttp.ClientSession:
    """A client of the same gateway with another token."""
    return aiohttp.ClientSession(admin._base_url, headers={"Authorization": f"Bearer {token}"})


async def _answer(s: aiohttp.ClientSession, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with s.request(method, path, **kw) as r:
        return r.status, await r.json(content_type=None) if r.status != 204 else None


async def test_a_release_runs_only_a_check_ops_declared(api, probe_factory):  # noqa: F811
    await _create(api, app="web")
    probe = await probe_factory("host.*.deploy")
    async with _as(api, await _token(api, "release")) as rel:
        inline_cmd = await _answer(rel, "POST", "/v1/releases", json={
            **RELEASE, "health_check": {"type": "cmd", "target": "rm -rf /"}})
        undeclared = await _answer(rel, "POST", "/v1/releases", json={**RELEASE, "check": "smoke"})
        declare_as_release = await _answer(rel, "PUT", "/v1/apps/web/checks/smoke", json=SMOKE)
        declared = await _answer(api, "PUT", "/v1/apps/web/checks/smoke", json=SMOKE)
        started = await _answer(rel, "POST", "/v1/releases", json={
            **RELEASE, "check": "smoke", "release_id": "r-smoke"})
    (deploy,) = await probe.wait_for("deploy")
    listed = await _answer(api, "GET", "/v1/apps/web/checks")

    assert inline_cmd[0] == 422
    assert [e["field"] for e in inline_cmd[1]["errors"]] == ["(body)"]
    assert "declared" in inline_cmd[1]["errors"][0]["message"]
    assert (undeclared[0], undeclared[1]["reason"]) == (422, "unknown_check")
    assert (declare_as_release[0], declare_as_release[1]["reason"]) == (403, "forbidden")
    assert (declared[0], declared[1]["declared_by"]) == (200, "admin")
    assert started[0] == 202, started
    assert started[1]["spec"]["check"] == "smoke"
    assert started[1]["spec"]["health_check"] == SMOKE_SENT
    assert deploy.health_check.model_dump() == SMOKE_SENT
    assert [c["name"] for c in listed[1]["items"]] == ["smoke"]


async def test_a_declared_checks_fail_after_reaches_the_deploy(api, probe_factory):  # noqa: F811
    await _create(api, app="web")
    probe = await probe_factory("host.*.deploy")
    up = {"type": "http", "target": "8080/", "timeout_s": 120, "fail_after": 3}
    declared = await _answer(api, "PUT", "/v1/apps/web/checks/up", json=up)
    started = await _answer(api, "POST", "/v1/releases", json={**RELEASE, "check": "up"})
    (deploy,) = await probe.wait_for("deploy")
    listed = await _answer(api, "GET", "/v1/apps/web/checks")

    assert (declared[0], declared[1]["fail_after"]) == (200, 3)
    assert started[0] == 202, started
    assert deploy.health_check.model_dump() == up
    assert [c["fail_after"] for c in listed[1]["items"]] == [3]


async def test_an_inline_port_probe_needs_no_declaration(api, probe_factory):  # noqa: F811
    await _create(api, app="web")
    probe = await probe_factory("host.*.deploy")
    http = {"type": "http", "target": "8000/health", "timeout_s": 5.0}
    async with _as(api, await _token(api, "release")) as rel:
        started = await _answer(rel, "POST", "/v1/releases", json={**RELEASE, "health_check": http})
    (deploy,) = await probe.wait_for("deploy")

    assert started[0] == 202, started
    assert deploy.health_check.model_dump() == {**http, "fail_after": None}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "tcp", "target": "not-a-port"}, "(body)"),
        ({"type": "exec", "target": "x"}, "type"),
        ({"type": "cmd", "target": "true", "shell": "bash"}, "shell"),
    ],
    ids=["port-target", "unknown-type", "unknown-field"],
)
async def test_a_bad_declaration_is_422_and_declares_nothing(api, body, field):  # noqa: F811
    status, problem = await _answer(api, "PUT", "/v1/apps/web/checks/smoke", json=body)
    _, listed = await _answer(api, "GET", "/v1/apps/web/checks")

    assert (status, [e["field"] for e in problem["errors"]]) == (422, [field])
    assert listed["items"] == []


async def test_a_token_scoped_to_web_cannot_touch_api(api, peers):  # noqa: F811
    web_id = (await _create(api, app="web"))["machines"][0]["id"]
    api_id = (await _create(api, app="api"))["machines"][0]["id"]
    async with _as(api, await _token(api, "ops", ["web"])) as ops:
        refused = {
            "show": await _answer(ops, "GET", f"/v1/machines/{api_id}"),
            "list": await _answer(ops, "GET", "/v1/machines?app=api"),
            "stop": await _answer(ops, "POST", f"/v1/machines/{api_id}/stop"),
            "destroy": await _answer(ops, "DELETE", f"/v1/machines/{api_id}"),
            "scale": await _answer(ops, "POST", "/v1/apps/api/scale", json={"count": 0}),
            "declare": await _answer(ops, "PUT", "/v1/apps/api/checks/smoke", json=SMOKE),
            "grant": await _answer(ops, "POST", "/v1/grants", json={
                "user": "alice", "machine_id": api_id, "ttl_s": 60}),
            "sessions": await _answer(ops, "GET", f"/v1/sessions?machine_id={api_id}"),
            "create": await _answer(ops, "POST", "/v1/machines", json={
                "app": "api", "image": "127.0.0.1:5001/dockvm/base:bookworm", "cpus": 1,
                "memory": "512m", "disk": "1g", "dc": "dc1", "vlan_id": 233}),
        }
        own = await _answer(ops, "GET", f"/v1/machines/{web_id}")
        own_check = await _answer(ops, "PUT", "/v1/apps/web/checks/smoke", json=SMOKE)
    _, api_machine = await _answer(api, "GET", f"/v1/machines/{api_id}")
    _, listed = await _answer(api, "GET", "/v1/machines?app=api")

    assert {k: (s, p["reason"]) for k, (s, p) in refused.items()} == {
        k: (403, "out_of_scope") for k in refused}
    assert "scoped to web, not to api" in refused["destroy"][1]["detail"]
    assert (own[0], own_check[0]) == (200, 200)
    assert (api_machine["state"], len(listed["items"])) == ("running", 1)


async def test_a_scoped_release_token_releases_only_its_apps(api):  # noqa: F811
    async with _as(api, await _token(api, "release", ["web", "shop"])) as rel:
        other = await _answer(rel, "POST", "/v1/releases", json={
            **RELEASE, "app": "api", "health_check": {"type": "tcp", "target": "8000"}})
        other_list = await _answer(rel, "GET", "/v1/releases?app=api")
        own_list = await _answer(rel, "GET", "/v1/releases?app=web")
    _, tokens = await _answer(api, "GET", "/v1/tokens")
    _, audit = await _answer(api, "GET", "/v1/audit?who=release-bot")

    assert (other[0], other[1]["reason"]) == (403, "out_of_scope")
    assert (other_list[0], own_list[0]) == (403, 200)
    assert [t["apps"] for t in tokens["items"]] == [None, ["shop", "web"]]
    assert [(e["method"], e["status"]) for e in audit["items"]] == [("POST", 403)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "root2", "role": "admin", "apps": ["web"]}, "(body)"),
        ({"name": "x", "role": "ops", "apps": []}, "apps"),
        ({"name": "x", "role": "ops", "apps": ["Not An App"]}, "apps.0"),
    ],
    ids=["admin-scoped", "empty-scope", "bad-app-name"],
)
async def test_a_bad_scope_is_422_and_makes_no_token(api, body, field):  # noqa: F811
    status, problem = await _answer(api, "POST", "/v1/tokens", json=body)
    _, tokens = await _answer(api, "GET", "/v1/tokens")

    assert (status, [e["field"] for e in problem["errors"]]) == (422, [field])
    assert [t["role"] for t in tokens["items"]] == ["admin"]


async def test_the_cli_declares_checks_and_scopes_tokens(api, gateway, service_env):  # noqa: F811
    await _create(api, app="web")
    env = {"DOCKVM_URL": gateway.url, "DOCKVM_STATE_DIR": service_env["DOCKVM_STATE_DIR"]}
    declared = await _cli(env, "app", "check", "set", "web", "smoke", "--type", "cmd",
                          "--target", "/usr/local/bin/smoke", "--json")
    listed = await _cli(env, "app", "check", "list", "web", "--json")
    token = await _cli(env, "token", "create", "rel", "--role", "release", "--app", "web",
                       "--json")
    rel_env = {"DOCKVM_URL": gateway.url, "DOCKVM_TOKEN": json.loads(token[1])["token"]}
    coords = ("--group", "com.example", "--artifact", "demo-app", "--version", "1.0.0")
    inline_cmd = await _cli(rel_env, "release", "create", "web", *coords, "--check", "cmd:true")
    other_app = await _cli(rel_env, "release", "create", "api", *coords, "--check-name", "smoke",
                           "--no-wait", "--json")
    started = await _cli(rel_env, "release", "create", "web", *coords, "--check-name", "smoke",
                         "--no-wait", "--json")

    assert declared[0] == 0 and json.loads(declared[1])["type"] == "cmd"
    assert [c["name"] for c in json.loads(listed[1])] == ["smoke"]
    assert json.loads(token[1])["apps"] == ["web"]
    assert inline_cmd[0] == 2 and "--check-name" in inline_cmd[2]
    assert other_app[0] == 1 and "403" in other_app[2]
    assert started[0] == 0, started
    assert json.loads(started[1])["spec"]["health_check"]["target"] == "/usr/local/bin/smoke"


async def test_a_token_cannot_revoke_itself_so_an_admin_is_always_left(api):  # noqa: F811
    _, tokens = await _answer(api, "GET", "/v1/tokens")
    (root,) = [t["id"] for t in tokens["items"]]
    second = await _token(api, "admin")
    own = await _answer(api, "DELETE", f"/v1/tokens/{root}")
    async with _as(api, second) as other:
        by_other = await _answer(other, "DELETE", f"/v1/tokens/{root}")
    after = await _answer(api, "GET", "/v1/tokens")

    assert (own[0], own[1]["reason"]) == (409, "own_token")
    assert by_other[0] == 204
    assert after[0] == 401
