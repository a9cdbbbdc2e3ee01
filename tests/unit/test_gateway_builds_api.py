"""The gateway's image policy and build routes in an in-memory app, with a fake builder RPC: the
policy is versioned (a stale ``If-Match`` is a 409, nothing stored), a refused spec is a 422
naming every item with nothing sent to the builder, a passing one is sent with the policy
version it was checked against, and the log streams the builder's chunks to the end."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from libs.common.contracts import Message
from libs.common.contracts import builder as bld
from services.gateway.api import GatewayState, build_api, problem_middleware
from services.gateway.api.policy import POLICY
from services.gateway.image_policy import MemoryPolicyStore
from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit
T0 = datetime(2026, 11, 29, 8, 0, tzinfo=UTC)


class _Store:
    def __init__(self) -> None:
        self.audit: list[dict[str, Any]] = []

    async def token_by_secret(self, token: str) -> dict[str, Any] | None:
        role = token.removeprefix("t-")
        return {"name": role, "role": role}

    async def audit_write(self, entry: dict[str, Any]) -> None:
        self.audit.append(entry)


class _Builder:
    """Plays the builder: answers a submit with a queued build, logs from ``chunks``."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.chunks = ["==> build\n", "step 1\n", "==> done\n"]

    async def request(self, msg: Message, *, routing_key: str | None = None,
                      timeout: float = 10.0) -> Message:  # fmt: skip
        self.sent.append(msg)
        if isinstance(msg, bld.BuildSubmit):
            return bld.BuildInfo(id=msg.id, name=msg.spec.name, tag=msg.spec.tag, state="queued",
                                 spec=msg.spec, spec_digest=msg.spec_digest,
                                 policy_version=msg.policy_version,
                                 requested_by=msg.requested_by, created_at=T0)  # fmt: skip
        if isinstance(msg, bld.BuildLog):
            if msg.id == "b-unknown":
                return bld.BuildRejected(reason="not_found", detail="no build b-unknown")
            # One chunk per call, so the stream must ask again until done.
            seq = msg.after + 1
            done = seq >= len(self.chunks) - 1
            line = bld.LogLine(seq=seq, text=self.chunks[seq])
            state = "succeeded" if done else "running"
            return bld.BuildLogChunk(id=msg.id, chunks=[line], state=state, done=done)
        raise AssertionError(f"unexpected {msg.TYPE}")


@pytest.fixture
def builder() -> _Builder:
    return _Builder()


@pytest.fixture
async def client(builder: _Builder) -> AsyncIterator[TestClient]:
    state = GatewayState(store=_Store(), driver=None, rpc=builder, settings=GatewaySettings())  # type: ignore[arg-type]
    api = build_api(state)
    api.provide(POLICY, MemoryPolicyStore())
    app = web.Application(middlewares=[problem_middleware])
    api.mount(app)
    async with TestClient(
        TestServer(app, host="127.0.0.1"), headers={"Authorization": "Bearer t-admin"}
    ) as c:
        yield c


async def test_the_policy_is_versioned_and_a_stale_change_is_refused(client: TestClient):
    policy = bld.DEFAULT_POLICY.model_dump(mode="json") | {"run_allowed": True}

    first = await client.get("/v1/images/policy")
    put = await client.put("/v1/images/policy", json=policy, headers={"If-Match": "0"})
    stale = await client.put("/v1/images/policy", json=policy, headers={"If-Match": "0"})
    now = await (await client.get("/v1/images/policy")).json()

    assert (await first.json())["version"] == 0
    assert put.status == 200 and (await put.json())["version"] == 1
    assert stale.status == 409 and (await stale.json())["reason"] == "policy_changed"
    assert now["version"] == 1 and now["set_by"] == "admin" and now["policy"]["run_allowed"]


async def test_a_policy_change_is_for_admins_only(client: TestClient):
    policy = bld.DEFAULT_POLICY.model_dump(mode="json")
    ops = {"Authorization": "Bearer t-ops"}

    r = await client.put("/v1/images/policy", json=policy, headers=ops)

    assert r.status == 403


async def test_a_refused_spec_is_a_422_naming_every_item_and_sends_nothing(client, builder):
    spec = {"name": "team/web", "tag": "1", "base": "scratch", "packages": ["gcc"], "ports": [22]}

    r = await client.post("/v1/images/builds", json=spec)
    problem = await r.json()

    assert r.status == 422
    assert [e["field"] for e in problem["errors"]] == ["base", "packages.0", "ports.0"]
    assert builder.sent == []


async def test_a_passing_spec_goes_to_the_builder_with_its_policy_version(client, builder):
    spec = {"name": "team/web", "tag": "1", "base": "debian-bookworm", "packages": ["curl"]}

    r = await client.post("/v1/images/builds", json=spec)
    body = await r.json()

    (sent,) = builder.sent
    assert r.status == 202 and body["state"] == "queued" and body["id"] == sent.id
    assert (sent.policy_version, sent.requested_by) == (0, "admin")
    assert sent.spec_digest == bld.spec_digest(bld.BuildSpec.model_validate(spec))


async def test_the_log_streams_every_chunk_to_the_end(client: TestClient):
    r = await client.get("/v1/images/builds/b-abcdef12/log")

    assert r.status == 200 and await r.text() == "==> build\nstep 1\n==> done\n"


async def test_the_log_of_an_unknown_build_is_a_404(client: TestClient):
    r = await client.get("/v1/images/builds/b-unknown/log")

    assert r.status == 404
