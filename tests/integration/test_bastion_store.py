"""The bastion's store and machine directory: one contract, the fake and MongoDB/FerretDB."""

from __future__ import annotations

from datetime import timedelta

import pytest

from libs.common.clock import utcnow
from libs.common.errors import ConflictError
from services.bastion.fakes import MemoryBastionStore, MemoryHostKeyPins, MemoryMachines
from services.bastion.store import MongoBastionStore, MongoHostKeyPins, MongoMachineDirectory

NOW = utcnow()


@pytest.fixture(params=["memory", "mongo"])
def store(request, mongo_db):
    return MemoryBastionStore() if request.param == "memory" else MongoBastionStore(mongo_db)


def _session(sid: str, user: str, ip: str, minutes: int, live: bool = False) -> dict:
    return {"_id": sid, "owner": "h:1:a", "user": user, "login": "root", "machine_id": "m-1",
            "app": "web", "ip": ip, "hostname": "web-1", "kind": "exec", "command": "true",
            "client_addr": None, "grant_id": "g-1", "record_input": False,
            "started_at": NOW + timedelta(minutes=minutes), "ended_at": None, "live": live,
            "exit_status": None, "end_reason": None, "bytes_in": 0, "bytes_out": 0,
            "recording_path": None}


async def test_users_are_replaced_whole_and_removed_once(store):
    user = {"_id": "alice", "uid": "u1", "keys": ["k"], "fingerprints": ["f"],
            "created_at": NOW, "updated_at": NOW}
    await store.put_user(user)
    await store.put_user({**user, "keys": ["k2"], "fingerprints": ["f2"]})
    await store.put_user({**user, "_id": "adam"})
    assert (await store.get_user("alice"))["keys"] == ["k2"]
    assert [u["_id"] for u in await store.list_users()] == ["adam", "alice"]
    assert await store.delete_user("alice") is True
    assert await store.delete_user("alice") is False
    assert await store.get_user("alice") is None


async def test_a_grant_id_is_inserted_once(store):
    grant = {"_id": "g-1", "user": "alice", "user_uid": "u1", "app": "web", "machine_id": None,
             "login": "root", "record_input": False, "created_at": NOW,
             "expires_at": NOW + timedelta(hours=1)}
    await store.insert_grant(grant)
    with pytest.raises(ConflictError):
        await store.insert_grant(grant)
    await store.insert_grant({**grant, "_id": "g-2", "user": "bob",
                              "created_at": NOW + timedelta(seconds=1)})
    assert [g["_id"] for g in await store.list_grants()] == ["g-1", "g-2"]
    assert [g["_id"] for g in await store.list_grants("bob")] == ["g-2"]
    assert (await store.get_grant("g-1"))["expires_at"] == grant["expires_at"]
    assert await store.delete_grant("g-1") and not await store.delete_grant("g-1")


async def test_rules_are_listed_oldest_first(store):
    for i in (2, 1):
        await store.insert_rule({"_id": f"r-{i}", "pattern": "x", "description": "",
                                 "created_at": NOW + timedelta(seconds=i)})
    assert [r["_id"] for r in await store.list_rules()] == ["r-1", "r-2"]
    assert await store.delete_rule("r-1") and not await store.delete_rule("r-1")


async def test_sessions_filter_by_user_ip_and_start_and_list_newest_first(store):
    for doc in (_session("s-1", "alice", "10.0.0.5", 0), _session("s-2", "bob", "10.0.0.5", 1),
                _session("s-3", "alice", "10.0.0.6", 2, live=True)):
        await store.insert_session(doc)
    await store.update_session("s-3", {"live": False, "exit_status": 0})

    async def ids(limit: int = 100, **flt) -> list[str]:
        return [d["_id"] for d in await store.list_sessions(flt, limit)]

    assert await ids() == ["s-3", "s-2", "s-1"]
    assert await ids(limit=1) == ["s-3"]
    assert await ids(user="alice") == ["s-3", "s-1"]
    assert await ids(ip="10.0.0.5") == ["s-2", "s-1"]
    assert await ids(since=NOW + timedelta(minutes=1)) == ["s-3", "s-2"]
    assert await ids(until=NOW + timedelta(minutes=1)) == ["s-2", "s-1"]
    assert await ids(live=True) == []
    assert (await store.get_session("s-3"))["exit_status"] == 0


@pytest.fixture(params=["memory", "mongo"])
async def directory(request, mongo_db):
    docs = [
        {"_id": "m-1", "app": "web", "state": "running", "hostname": "web-1", "ip": "10.0.0.5"},
        {"_id": "m-2", "app": "web", "state": "destroyed", "hostname": "web-2", "ip": "10.0.0.6"},
        {"_id": "m-3", "app": "db", "state": "stopped", "hostname": "db-1", "ip": "10.0.0.7"},
    ]
    if request.param == "memory":
        return MemoryMachines(docs)
    await mongo_db["machine_summaries"].insert_many([{**d, "dc": "dc1"} for d in docs])
    return MongoMachineDirectory(mongo_db)


async def test_sessions_ended_before_a_time_are_listed_and_deleted_by_id(store):
    for sid, ended in (("s-old", -120), ("s-new", -1), ("s-live", None)):
        doc = _session(sid, "alice", "10.0.0.5", -200, live=ended is None)
        if ended is not None:
            doc["ended_at"] = NOW + timedelta(minutes=ended)
        await store.insert_session(doc)
    ended = await store.ended_before(NOW - timedelta(minutes=60))
    assert [(d["_id"], d["live"]) for d in ended] == [("s-old", False)]
    assert await store.delete_sessions(["s-old", "s-missing"]) == 1
    assert await store.delete_sessions([]) == 0
    assert await store.get_session("s-old") is None
    assert await store.get_session("s-new") is not None


async def test_host_keys_are_pinned_once(pins):
    assert await pins.pinned("m-1") is None
    assert await pins.pin("m-1", ["ssh-ed25519 AAAA1"]) == ["ssh-ed25519 AAAA1"]
    assert await pins.pin("m-1", ["ssh-ed25519 BBBB2"]) == ["ssh-ed25519 AAAA1"]
    assert await pins.pinned("m-1") == ["ssh-ed25519 AAAA1"]


@pytest.fixture(params=["memory", "mongo"])
def pins(request, mongo_db):
    return MemoryHostKeyPins() if request.param == "memory" else MongoHostKeyPins(mongo_db)


async def test_the_directory_finds_live_machines_by_ip_id_hostname_or_app(directory):
    assert [m["_id"] for m in await directory.named("10.0.0.5")] == ["m-1"]
    assert [m["_id"] for m in await directory.named("m-3")] == ["m-3"]
    assert [m["_id"] for m in await directory.named("db-1")] == ["m-3"]
    assert await directory.named("web-2") == []
    assert [m["_id"] for m in await directory.of(["web"], ["m-3"])] == ["m-1", "m-3"]
    assert await directory.of([], []) == []
