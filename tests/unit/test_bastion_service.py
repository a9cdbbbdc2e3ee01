"""The bastion's use cases on the in-memory fakes: users, grants, live sessions, the watchdog."""

from __future__ import annotations

import os
from datetime import timedelta

import asyncssh
import pytest

from libs.common.bus import MemoryPublisher
from libs.common.clock import utcnow
from libs.common.errors import ConflictError, DomainError, NotFoundError, ValidationFailed
from services.bastion.documents import MachineView, SessionDoc
from services.bastion.domain import Refused, parse_target
from services.bastion.fakes import MemoryBastionStore, MemoryMachines
from services.bastion.handlers import _rejected
from services.bastion.service import Access, Admin, LiveSession, LiveSessions

KEY = asyncssh.generate_private_key("ssh-ed25519")
OTHER = asyncssh.generate_private_key("ssh-ed25519")
PUB = KEY.export_public_key().decode()
WEB1: MachineView = {"_id": "m-1", "app": "web", "state": "running", "hostname": "web-1",
                     "ip": "10.0.0.5"}
ME = f"testhost:{os.getpid()}:aaaa"


@pytest.fixture
def world():
    store, machines, pub = MemoryBastionStore(), MemoryMachines([WEB1]), MemoryPublisher()
    live = LiveSessions(store, pub, ME, idle_timeout_s=60, max_session_s=3600)
    return store, machines, pub, live, Admin(store, live), Access(store, machines, pub)


def session(sid: str, user: str, uid: str, grant_id: str, ended: list[str],
            owner: str = ME) -> LiveSession:
    doc: SessionDoc = {
        "_id": sid, "owner": owner, "user": user, "login": "root", "machine_id": "m-1",
        "app": "web", "ip": "10.0.0.5", "hostname": "web-1", "kind": "shell", "command": None,
        "client_addr": None, "grant_id": grant_id, "record_input": False,
        "started_at": utcnow(), "ended_at": None, "live": True, "exit_status": None,
        "end_reason": None, "bytes_in": 0, "bytes_out": 0, "recording_path": None,
    }
    return LiveSession(doc, uid, on_end=ended.append)


async def test_a_user_is_replaced_by_name_and_keeps_her_uid(world):
    store, *_, admin, access = world
    first = await admin.add_user("alice", [PUB])
    second = await admin.add_user("alice", [OTHER.export_public_key().decode()])
    assert (second["uid"], second["created_at"]) == (first["uid"], first["created_at"])
    assert await access.key_allowed("alice", OTHER)
    assert not await access.key_allowed("alice", KEY)
    assert not await access.key_allowed("bob", KEY)
    with pytest.raises(ValidationFailed, match=r"^ssh_keys\.0"):
        await admin.add_user("carol", ["not a key"])
    assert await store.get_user("carol") is None


async def test_a_grant_needs_a_user_and_a_retry_with_its_id_answers_the_same_grant(world):
    *_, admin, _access = world
    with pytest.raises(NotFoundError):
        await admin.add_grant("alice", app="web", machine_id=None, login="root", ttl_s=60,
                              record_input=False)
    await admin.add_user("alice", [PUB])
    kw = {"app": "web", "machine_id": None, "login": "root", "ttl_s": 60, "record_input": False}
    g1 = await admin.add_grant("alice", grant_id="g-x", **kw)
    g2 = await admin.add_grant("alice", grant_id="g-x", **kw)
    assert g1 == g2
    with pytest.raises(ConflictError):
        await admin.add_grant("alice", grant_id="g-x", **{**kw, "login": "admin"})


async def test_revoking_ends_only_the_sessions_the_grant_let_in(world):
    _store, _m, _p, live, admin, _a = world
    user = await admin.add_user("alice", [PUB])
    kw = {"app": "web", "machine_id": None, "login": "root", "ttl_s": 60, "record_input": False}
    g1 = await admin.add_grant("alice", **kw)
    g2 = await admin.add_grant("alice", **kw)
    ended: list[str] = []
    await live.start(session("s-1", "alice", user["uid"], g1["_id"], ended))
    await live.start(session("s-2", "alice", user["uid"], g2["_id"], ended))
    assert await admin.revoke_grant(g1["_id"]) == 1
    assert ended == ["revoked"]
    with pytest.raises(NotFoundError):
        await admin.revoke_grant(g1["_id"])
    assert await admin.remove_user("alice") == (1, 1)
    assert ended == ["revoked", "user_removed"]


async def test_a_user_added_again_does_not_inherit_old_grants(world):
    store, _m, _p, _live, admin, access = world
    await admin.add_user("alice", [PUB])
    await admin.add_grant("alice", app="web", machine_id=None, login="root", ttl_s=60,
                          record_input=False)
    old = await store.list_grants("alice")
    await admin.remove_user("alice")
    await store.insert_grant(old[0])  # a grant written while she was being removed
    await admin.add_user("alice", [PUB])
    with pytest.raises(Refused) as err:
        await access.authorize("alice", parse_target("root@10.0.0.5"))
    assert err.value.reason == "no_grant"


async def test_an_app_grant_reaches_machines_created_after_it(world):
    _store, machines, _p, _live, admin, access = world
    await admin.add_user("alice", [PUB])
    await admin.add_grant("alice", app="web", machine_id=None, login="root", ttl_s=60,
                          record_input=False)
    later: MachineView = {**WEB1, "_id": "m-2", "ip": "10.0.0.6", "hostname": "web-2"}
    machines.machines.append(later)
    auth = await access.authorize("alice", parse_target("web-2"))
    assert (auth.machine["_id"], auth.login) == ("m-2", "root")
    assert [m["_id"] for m, _g in await access.reachable("alice")] == ["m-1", "m-2"]
    machines.machines[1] = {**later, "state": "destroyed"}
    assert [m["_id"] for m, _g in await access.reachable("alice")] == ["m-1"]


async def test_the_watchdog_ends_expired_idle_and_too_long_sessions(world):
    store, _m, _p, live, admin, _a = world
    user = await admin.add_user("alice", [PUB])
    g = await admin.add_grant("alice", app="web", machine_id=None, login="root", ttl_s=600,
                              record_input=False)
    ended: list[str] = []
    ok, idle, old = (session(f"s-{i}", "alice", user["uid"], g["_id"], ended) for i in range(3))
    for s in (ok, idle, old):
        await live.start(s)
    idle.last_activity -= 61
    old.started -= 3601
    await live.watch()
    assert sorted(ended) == ["idle", "max_duration"]
    store.grants[g["_id"]]["expires_at"] = utcnow() - timedelta(seconds=1)
    await live.watch()
    assert ok.end_reason == "grant_expired"


async def test_a_finished_session_is_recorded_and_announced(world):
    store, _m, pub, live, admin, _a = world
    user = await admin.add_user("alice", [PUB])
    s = session("s-1", "alice", user["uid"], "g-1", [])
    await live.start(s)
    await live.finish(s, {"exit_status": 3, "bytes_in": 4, "bytes_out": 5})
    doc = store.sessions["s-1"]
    assert (doc["live"], doc["exit_status"], doc["end_reason"]) == (False, 3, "exit")
    assert [m.TYPE for _, m in [(k, e.parse()) for k, e in pub.sent]] == [
        "session.started", "session.ended"
    ]
    assert not live.has("s-1")


async def test_sessions_of_a_dead_bastion_on_this_host_are_closed_at_start(world):
    store, _m, _p, live, _admin, _a = world
    dead = 2**22 + 7  # above the kernel's largest pid_max: no such process
    for sid, owner in [("s-dead", f"testhost:{dead}:bbbb"), ("s-alive", "testhost:1:cccc"),
                       ("s-elsewhere", f"otherhost:{dead}:dddd")]:
        await store.insert_session(session(sid, "alice", "u", "g", [], owner).doc)
    assert await live.recover() == 1
    assert {k: d["live"] for k, d in store.sessions.items()} == {
        "s-dead": False, "s-alive": True, "s-elsewhere": True
    }


@pytest.mark.parametrize(
    ("err", "reason", "field"),
    [
        (ValidationFailed("ssh_keys.0: not an OpenSSH public key"), "invalid", "ssh_keys.0"),
        (NotFoundError("no user 'bob'"), "not_found", None),
        (ConflictError("grant g-1 exists"), "conflict", None),
        (DomainError("odd"), "invalid", None),
    ],
)
def test_a_refusal_is_answered_with_its_reason_and_field(err, reason, field):
    out = _rejected(err)
    assert (out.reason, out.field) == (reason, field)
