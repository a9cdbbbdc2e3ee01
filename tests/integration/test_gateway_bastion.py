"""The gateway's bastion routes against a real bastion and a real machine: the whole path of
an ops person (register a user, grant, ssh through the bastion, list the session, download its
recording, revoke, remove) over HTTP, the audit log showing the bastion's events beside the API
actions, and the input the gateway refuses itself (422) before asking the bastion.

The machine is the bastion tests' box (a base-image container whose sshd trusts the module's
bastion CA), described to the bastion in ``machine_summaries`` as the gateway would.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from tests.integration.test_bastion_support import (  # noqa: F401 (fixtures)
    ALICE,
    Box,
    bastion_state_fixture,
    box_fixture,
    summary,
)
from tests.support.stack import free_port

pytestmark = pytest.mark.integration

ALICE_KEY = ALICE.export_public_key().decode().strip()


@dataclass
class Stack:
    """A gateway and a bastion on one vhost and database, and an admin client."""

    api: aiohttp.ClientSession
    ssh_port: int
    box: Box
    url: str

    async def ssh(self, command: str) -> asyncssh.SSHCompletedProcess:
        """Run ``command`` on the box through the bastion, as alice."""
        async with asyncssh.connect(
            "127.0.0.1", self.ssh_port, username="alice", client_keys=[ALICE],
            known_hosts=None, agent_path=None, connect_timeout=15,
        ) as conn:  # fmt: skip
            return await conn.run(f"root@{self.box.ip} {command}")

    async def upload(self, name: str, data: bytes) -> None:
        """Put a file into the box's /tmp through the bastion's sftp, as alice."""
        async with asyncssh.connect(
            "127.0.0.1", self.ssh_port, username="alice", client_keys=[ALICE],
            known_hosts=None, agent_path=None, connect_timeout=15,
        ) as conn, conn.start_sftp_client() as sftp:  # fmt: skip
            async with sftp.open(f"/root@{self.box.ip}/tmp/{name}", "wb") as f:
                await f.write(data)


@pytest.fixture
async def stack(
    start_service: Any, service_env: dict[str, str], bastion_state: Path, box: Box, mongo_db: Any
) -> AsyncIterator[Stack]:
    """The bastion (its state, and so its CA, the module's), the gateway, the box described."""
    ssh_port = free_port()
    await start_service("bastion", env={
        "DOCKVM_STATE_DIR": str(bastion_state), "DOCKVM_BASTION_SSH_PORT": str(ssh_port)})
    gateway = await start_service("gateway", env={"DOCKVM_RPC_TIMEOUT_S": "10"})
    await summary(mongo_db, box)
    token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(gateway.url, headers=headers) as api:
        yield Stack(api, ssh_port, box, gateway.url)


async def _json(resp: aiohttp.ClientResponse) -> Any:
    return json.loads(await resp.text())


async def _audit_events(api: aiohttp.ClientSession, wanted: set[str]) -> list[dict]:
    """The audit log once it holds an entry of each of ``wanted`` event types."""
    async with asyncio.timeout(20):
        while True:
            async with api.get("/v1/audit", params={"limit": "200"}) as r:
                items = (await _json(r))["items"]
            if wanted <= {i.get("event") for i in items}:
                return items
            await asyncio.sleep(0.2)


async def test_add_a_user_grant_ssh_list_replay_revoke_and_remove(stack: Stack):
    api = stack.api
    async with api.post("/v1/users", json={"name": "alice", "ssh_keys": [ALICE_KEY]}) as r:
        user = (r.status, await _json(r))
    grant_body = {"user": "alice", "machine_id": stack.box.machine_id, "ttl_s": 600}
    async with api.post("/v1/grants", json=grant_body) as r:
        grant = (r.status, await _json(r))
    result = await stack.ssh("echo through-the-bastion; exit 3")
    await stack.upload("notes.txt", b"x" * 1000)
    params = {"user": "alice", "ip": stack.box.ip}
    async with api.get("/v1/sessions", params=params) as r:
        items = (await _json(r))["items"]
    sessions = [s for s in items if s["kind"] == "exec"]
    sftp = [s for s in items if s["kind"] == "sftp"]
    async with api.get(f"/v1/sessions/{sftp[0]['id']}/recording") as r:
        sftp_cast = (r.status, (await _json(r)).get("detail", ""))
    async with api.get("/v1/users") as r:
        users = (await _json(r))["items"]
    async with api.get("/v1/grants", params={"user": "alice"}) as r:
        grants = (await _json(r))["items"]
    sid = sessions[0]["id"]
    async with api.get(f"/v1/sessions/{sid}") as r:
        one = await _json(r)
    async with api.get(f"/v1/sessions/{sid}/recording") as r:
        cast = (r.status, r.content_type, await r.text())
    audit = await _audit_events(api, {"session.started", "session.ended", "transfer.done"})
    async with api.delete(f"/v1/grants/{grant[1]['id']}") as r:
        revoked = (r.status, await _json(r))
    async with api.delete("/v1/users/alice") as r:
        removed = (r.status, await _json(r))
    async with api.get("/v1/users") as r:
        users_after = (await _json(r))["items"]

    assert user[0] == 201 and user[1]["name"] == "alice" and len(user[1]["fingerprints"]) == 1
    assert grant[0] == 201 and grant[1]["machine_id"] == stack.box.machine_id
    assert (result.exit_status, result.stdout) == (3, "through-the-bastion\n")
    assert [u["name"] for u in users] == ["alice"]
    assert [g["id"] for g in grants] == [grant[1]["id"]]
    assert [(s["user"], s["login"], s["ip"], s["kind"]) for s in sessions] == [
        ("alice", "root", stack.box.ip, "exec")]  # fmt: skip
    assert (one["id"], one["exit_status"], one["live"]) == (sid, 3, False)
    # The sftp session lists its transfer; it has no terminal recording, and the 404 says so.
    assert [(t["path"], t["size"], t["direction"]) for t in sftp[0]["transfers"]] == [
        ("/tmp/notes.txt", 1000, "upload")]  # fmt: skip
    assert sftp_cast[0] == 404 and "sftp sessions have no terminal recording" in sftp_cast[1]
    status, content_type, text = cast
    header, *events = text.splitlines()
    assert (status, content_type) == (200, "application/x-asciicast")
    assert json.loads(header)["version"] == 2
    assert "through-the-bastion" in "".join(json.loads(e)[2] for e in events if '"o"' in e)
    bastion_rows = [a for a in audit if a.get("role") == "bastion"]
    assert {(a["who"], a["event"], a["target"]) for a in bastion_rows} >= {
        ("alice", "session.started", sid), ("alice", "session.ended", sid)}  # fmt: skip
    transfers = [a for a in bastion_rows if a["event"] == "transfer.done"]
    assert [(t["method"], t["detail"]["path"], t["detail"]["size"]) for t in transfers] == [
        ("SFTP", "/tmp/notes.txt", 1000)]  # fmt: skip
    api_rows = {(a["method"], a["path"], a["status"]) for a in audit if a["role"] == "admin"}
    assert {("POST", "/v1/users", 201), ("POST", "/v1/grants", 201)} <= api_rows
    assert revoked[0] == 200 and revoked[1]["id"] == grant[1]["id"]
    assert removed == (200, {**removed[1], "name": "alice"})
    assert users_after == []


async def test_a_login_without_a_grant_is_refused_and_the_refusal_is_in_the_audit_log(
    stack: Stack,
):
    async with stack.api.post("/v1/users", json={"name": "alice", "ssh_keys": [ALICE_KEY]}):
        pass

    result = await stack.ssh("true")
    audit = await _audit_events(stack.api, {"session.refused"})

    assert result.exit_status != 0
    refused = [a for a in audit if a.get("event") == "session.refused"]
    assert [(a["who"], a["status"], a["detail"]["reason"]) for a in refused] == [
        ("alice", 403, "no_grant")]  # fmt: skip


async def test_unknown_things_are_404s_from_the_bastion(stack: Stack):
    api = stack.api
    grant = {"user": "nobody", "app": "web", "ttl_s": 60}

    async with api.post("/v1/grants", json=grant) as r:
        unknown_user = (r.status, (await _json(r)).get("reason"))
    async with api.delete("/v1/users/nobody") as r:
        no_user = r.status
    async with api.delete("/v1/grants/g-nope") as r:
        no_grant = r.status
    async with api.get("/v1/sessions/s-nope") as r:
        no_session = r.status
    async with api.get("/v1/sessions/s-nope/recording") as r:
        no_recording = (r.status, r.content_type)

    assert unknown_user == (404, "not_found")
    assert (no_user, no_grant, no_session) == (404, 404, 404)
    assert no_recording == (404, "application/problem+json")


async def test_a_bad_pattern_is_a_422_from_the_bastion_and_a_good_one_round_trips(stack: Stack):
    api = stack.api

    async with api.post("/v1/command-rules", json={"pattern": "rm (-rf"}) as r:
        bad = (r.status, [e["field"] for e in (await _json(r))["errors"]])
    good = {"pattern": r"mkfs", "description": "disks"}
    async with api.post("/v1/command-rules", json=good) as r:
        rule = await _json(r)
    async with api.get("/v1/command-rules") as r:
        listed = [x["id"] for x in (await _json(r))["items"]]
    async with api.delete(f"/v1/command-rules/{rule['id']}") as r:
        removed = r.status

    assert bad == (422, ["pattern"])
    assert listed == [rule["id"]]
    assert removed == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "fields"),
    [
        ("POST", "/v1/users", {"name": "Alice", "ssh_keys": [ALICE_KEY]}, {"name"}),
        ("POST", "/v1/users", {"name": "alice", "ssh_keys": []}, {"ssh_keys"}),
        ("POST", "/v1/users", {"name": "alice", "ssh_keys": ["not a key"]}, {"ssh_keys.0"}),
        ("POST", "/v1/users", {"name": "alice", "ssh_keys": [ALICE_KEY], "x": 1}, {"x"}),
        ("POST", "/v1/grants", {"user": "alice", "ttl_s": 60}, {"(body)"}),
        ("POST", "/v1/grants", {"user": "alice", "app": "web", "machine_id": "m1", "ttl_s": 60},
         {"(body)"}),
        ("POST", "/v1/grants", {"user": "alice", "app": "web", "ttl_s": 0}, {"ttl_s"}),
        ("POST", "/v1/grants", {"user": "alice", "app": "web", "ttl_s": 60, "login": "Root"},
         {"login"}),
        ("GET", "/v1/sessions?from=yesterday", None, {"query.from"}),
        ("GET", "/v1/sessions?from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z", None,
         {"query.(body)"}),
        ("GET", "/v1/sessions?limit=0", None, {"query.limit"}),
        ("GET", "/v1/sessions?color=red", None, {"query.color"}),
        ("POST", "/v1/command-rules", {"pattern": ""}, {"pattern"}),
        ("DELETE", "/v1/users/Not%20A%20Name", None, {"path.name"}),
        # A machine's own keys are break-glass only: without direct_ssh they would install
        # nothing, so they are refused rather than silently dropped.
        ("POST", "/v1/machines", {"app": "web", "image": "dockvm/base:bookworm", "cpus": 1,
                                  "memory": "256m", "disk": "1g", "dc": "dc1", "vlan_id": 5,
                                  "ssh_keys": [ALICE_KEY]}, {"(body)"}),
    ],
)  # fmt: skip
async def test_bad_input_is_a_422_naming_each_field_and_reaches_no_bastion(
    start_service: Any, service_env: dict[str, str], method: str, path: str, body: Any,
    fields: set[str],
):
    # No bastion runs here: a 422 proves the gateway refused the input by itself.
    gateway = await start_service("gateway")
    token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
    async with aiohttp.ClientSession(
        gateway.url, headers={"Authorization": f"Bearer {token}"}
    ) as api, api.request(method, path, json=body) as r:
        status, doc = r.status, await _json(r)

    assert status == 422
    assert {e["field"] for e in doc["errors"]} == fields


async def test_roles_admin_for_users_ops_for_grants_anyone_for_session_metadata(
    start_service: Any, service_env: dict[str, str]
):
    gateway = await start_service("gateway")
    admin = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
    tokens = {}
    async with aiohttp.ClientSession(gateway.url) as s:
        for role in ("ops", "viewer"):
            async with s.post("/v1/tokens", json={"name": role, "role": role},
                              headers={"Authorization": f"Bearer {admin}"}) as r:  # fmt: skip
                tokens[role] = (await _json(r))["token"]
        seen = {}
        for role, method, path in [
            ("ops", "POST", "/v1/users"), ("ops", "DELETE", "/v1/users/alice"),
            ("ops", "POST", "/v1/command-rules"), ("viewer", "POST", "/v1/grants"),
            ("viewer", "GET", "/v1/grants"), ("viewer", "GET", "/v1/sessions/s1/recording"),
            ("viewer", "DELETE", "/v1/sessions/s1"),
        ]:  # fmt: skip
            auth = {"Authorization": f"Bearer {tokens[role]}"}
            async with s.request(method, path, json={}, headers=auth) as r:
                seen[(role, method, path)] = r.status

    assert set(seen.values()) == {403}
