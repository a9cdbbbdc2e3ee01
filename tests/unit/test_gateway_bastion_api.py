"""The gateway's bastion routes in an in-memory aiohttp app on loopback, with a fake bus RPC that
plays the bastion: refusals become 404/409/422, a recording is streamed chunk by chunk, a
bastion of another version is a 503; and the bastion's events as audit entries, written once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import ClientPayloadError, web
from aiohttp.test_utils import TestClient, TestServer

from libs.common.contracts import Envelope, Message, bastion
from libs.common.errors import ConflictError, TransientError
from services.gateway.api import GatewayState, build_api, problem_middleware
from services.gateway.service.bastion_audit import audit_entry, record
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit
T0 = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


class _Store:
    def __init__(self) -> None:
        self.audit: list[dict[str, Any]] = []

    async def token_by_secret(self, token: str) -> dict[str, Any] | None:
        return {"name": "admin", "role": "admin"} if token == "t-admin" else None

    async def audit_write(self, entry: dict[str, Any]) -> None:
        if any(e.get("_id") == entry.get("_id") for e in self.audit if "_id" in entry):
            raise ConflictError("duplicate key")
        self.audit.append(entry)


class _Bastion:
    """Answers RPCs from a table of message type -> reply (or a function of the message)."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.sent: list[Message] = []

    async def request(self, msg: Message, *, routing_key: str | None = None,
                      timeout: float = 10.0) -> Message:  # fmt: skip
        self.sent.append(msg)
        answer = self.answers[msg.TYPE]
        reply = answer(msg) if callable(answer) else answer
        if isinstance(reply, Exception):
            raise reply
        return reply


@pytest.fixture
def peer() -> _Bastion:
    return _Bastion()


@pytest.fixture
async def client(peer: _Bastion) -> AsyncIterator[TestClient]:
    state = GatewayState(store=_Store(), driver=None, rpc=peer, settings=GatewaySettings())  # type: ignore[arg-type]
    app = web.Application(middlewares=[problem_middleware])
    build_api(state).mount(app)
    async with TestClient(
        TestServer(app, host="127.0.0.1"), headers={"Authorization": "Bearer t-admin"}
    ) as c:
        yield c


def _chunks(cast: str, size: int, live: bool = False, fail_at: int | None = None):
    """A bastion that serves ``cast`` ``size`` characters per RecordingGet."""

    def answer(msg: bastion.RecordingGet) -> Message | Exception:
        if fail_at is not None and msg.offset >= fail_at:
            return TransientError("bastion gone")
        data = cast[msg.offset : msg.offset + size]
        end = msg.offset + len(data)
        return bastion.RecordingChunk(
            session_id=msg.session_id, path="/x.cast", offset=msg.offset, next_offset=end,
            size=len(cast), data=data, eof=not live and end >= len(cast), live=live,
        )  # fmt: skip

    return answer


CAST = '{"version": 2, "width": 80, "height": 24}\n[0.1, "o", "hello\\r\\n"]\n[0.2, "o", "$ "]\n'


@pytest.mark.parametrize("size", [7, 1000])
async def test_a_recording_is_streamed_whole_in_the_bastions_chunks(client, peer, size):
    peer.answers["bastion.recording.get"] = _chunks(CAST, size)

    resp = await client.get("/v1/sessions/s1/recording")
    text = await resp.text()

    assert (resp.status, resp.content_type, text) == (200, "application/x-asciicast", CAST)
    offsets = [m.offset for m in peer.sent]
    assert offsets == list(range(0, len(CAST), size))


async def test_a_live_recording_is_served_as_far_as_it_is_written(client, peer):
    written = CAST[:50]
    peer.answers["bastion.recording.get"] = _chunks(written, 20, live=True)

    resp = await client.get("/v1/sessions/s1/recording")

    assert (resp.status, await resp.text()) == (200, written)


async def test_a_bastion_lost_mid_stream_cuts_the_stream_instead_of_ending_it_short(client, peer):
    peer.answers["bastion.recording.get"] = _chunks(CAST, 10, fail_at=30)

    resp = await client.get("/v1/sessions/s1/recording")

    assert resp.status == 200
    with pytest.raises(ClientPayloadError):
        await resp.read()


@pytest.mark.parametrize(
    ("reply", "status", "field"),
    [
        (bastion.BastionRejected(reason="not_found", detail="no session s9"), 404, None),
        (bastion.BastionRejected(reason="conflict", detail="busy"), 409, None),
        (bastion.BastionRejected(reason="invalid", detail="bad key", field="ssh_keys.0"), 422,
         "ssh_keys.0"),
        (bastion.RuleListing(rules=[]), 503, None),
    ],
)  # fmt: skip
async def test_the_bastions_answer_becomes_the_matching_problem(client, peer, reply, status, field):
    peer.answers["bastion.user.add"] = reply
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b"

    resp = await client.post("/v1/users", json={"name": "alice", "ssh_keys": [key]})
    doc = await resp.json()

    assert (resp.status, resp.content_type) == (status, "application/problem+json")
    assert [e["field"] for e in doc.get("errors", [])] == ([field] if field else [])


async def test_session_query_maps_from_and_to_onto_the_start_range(client, peer):
    peer.answers["bastion.session.list"] = bastion.SessionListing(sessions=[])

    resp = await client.get("/v1/sessions", params={
        "user": "alice", "ip": "10.0.0.5", "from": "2026-11-29T00:00:00Z",
        "to": "2026-11-30T00:00:00Z", "live": "true", "limit": "5"})  # fmt: skip

    assert resp.status == 200
    sent = peer.sent[0]
    assert isinstance(sent, bastion.SessionList)
    assert (sent.user, sent.ip, sent.live_only, sent.limit) == ("alice", "10.0.0.5", True, 5)
    assert (sent.since, sent.until) == (T0.replace(hour=0), T0.replace(hour=0, day=30))


async def test_a_time_without_an_offset_is_utc_and_compares_with_one_that_has_it(client, peer):
    peer.answers["bastion.session.list"] = bastion.SessionListing(sessions=[])

    params = {"from": "2026-11-29T00:00:00", "to": "2026-11-29T08:00:00Z"}
    resp = await client.get("/v1/sessions", params=params)

    assert resp.status == 200
    assert (peer.sent[0].since, peer.sent[0].until) == (T0.replace(hour=0), T0)


@pytest.mark.parametrize(
    "params",
    [{"from": "2026-11-29T09:00:00", "to": "2026-11-29T08:00:00Z"}, {"from": "0.5"}],
)
async def test_a_range_backwards_or_a_bare_number_is_a_422(client, peer, params):
    resp = await client.get("/v1/sessions", params=params)

    assert resp.status == 422
    assert peer.sent == []


# ---- audit entries ---------------------------------------------------------------------------


def _facts(**over: Any) -> dict[str, Any]:
    return {"session_id": "s1", "user": "alice", "login": "root", "machine_id": "m1",
            "ip": "10.0.0.5", "kind": "exec", "command": "uptime", **over}  # fmt: skip


@pytest.mark.parametrize(
    ("event", "method", "path", "status", "target"),
    [
        (bastion.SessionStarted(**_facts(), started_at=T0), "SSH",
         "started exec root@10.0.0.5 uptime", 0, "s1"),
        (bastion.SessionEnded(**_facts(), started_at=T0, ended_at=T0, exit_status=3,
                              end_reason="exit"), "SSH",
         "ended (exit) exec root@10.0.0.5 uptime", 3, "s1"),
        (bastion.TransferDone(session_id="s1", user="alice", login="root", ip="10.0.0.5",
                              path="/etc/hosts", size=12, direction="download", at=T0),
         "SFTP", "download root@10.0.0.5:/etc/hosts (12 bytes)", 0, "s1"),
        (bastion.SessionRefused(user="mallory", reason="no_grant", target="root@10.0.0.5",
                                at=T0), "SSH", "refused (no_grant) root@10.0.0.5", 403,
         "root@10.0.0.5"),
        (bastion.CommandBlocked(session_id="s1", user="alice", login="root", ip="10.0.0.5",
                                command="mkfs /dev/x", rule_id="r1", pattern="mkfs",
                                kind="exec", at=T0), "SSH", "blocked root@10.0.0.5 mkfs /dev/x",
         403, "s1"),
    ],
)  # fmt: skip
def test_each_bastion_event_is_one_audit_line(event, method, path, status, target):
    entry = audit_entry(event, Envelope.wrap(event, source="bastion", id="e1"))

    assert (entry["method"], entry["path"], entry["status"], entry["target"]) == (
        method, path, status, target)  # fmt: skip
    assert (entry["_id"], entry["role"], entry["event"], entry["at"]) == (
        "bastion:e1", "bastion", event.TYPE, T0)  # fmt: skip
    assert entry["who"] == event.user


async def test_a_redelivered_event_is_audited_once():
    store = _Store()
    event = bastion.SessionStarted(**_facts(), started_at=T0)
    env = Envelope.wrap(event, source="bastion", id="e1")

    await record(store, event, env)  # type: ignore[arg-type]
    await record(store, event, env)  # type: ignore[arg-type]

    assert [e["_id"] for e in store.audit] == ["bastion:e1"]
