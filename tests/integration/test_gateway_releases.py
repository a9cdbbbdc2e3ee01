"""Rolling releases on the real bus and the real MongoDB API; the test plays the hosts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from libs.common.contracts.releases import (
    DeployFailed,
    DeploySucceeded,
    HealthCheck,
    ReleaseRequested,
)
from libs.common.db import mongo_client
from libs.common.errors import DomainError, NotFoundError
from services.gateway.service import Releases, ReleaseStore
from tests.support.stack import MONGO_URL

MACHINES = [
    {"_id": "m1", "type": "docker", "host": "h1", "ip": "10.9.0.11"},
    {"_id": "m2", "type": "docker", "host": "h2", "ip": "10.9.0.12"},
    {"_id": "m3", "type": "kvm", "host": None, "ip": "10.9.0.13"},
    {"_id": "m4", "type": "docker", "host": "h1", "ip": "10.9.0.14"},
]


class Directory:
    """The machines the gateway knows, as a list (the gateway's own store is tested elsewhere)."""

    def __init__(self, machines: dict[str, list[dict[str, Any]]]) -> None:
        self.machines = machines

    async def app_exists(self, app: str) -> bool:
        return app in self.machines

    async def running(self, app: str) -> list[dict[str, Any]]:
        return list(self.machines.get(app, []))


def release(release_id: str = "r1", version: str = "2.0.0", **over: Any) -> ReleaseRequested:
    fields: dict[str, Any] = {
        "release_id": release_id, "app": "demo", "group_id": "com.example",
        "artifact_id": "demo-app", "version": version, "batch_size": 2, "max_failures": 0,
        "health_check": HealthCheck(type="http", target="8000/", timeout_s=5),
    }
    return ReleaseRequested(**(fields | over))


@pytest.fixture
async def releases(mongo_db, publisher):
    store = ReleaseStore(mongo_db)
    await store.setup()
    return Releases(store, publisher, Directory({"demo": MACHINES, "empty": []})), store


def ok(mid: str, rid: str = "r1") -> DeploySucceeded:
    return DeploySucceeded(release_id=rid, machine_id=mid, host="h", version="2.0.0")


def bad(mid: str, rid: str = "r1") -> DeployFailed:
    return DeployFailed(release_id=rid, machine_id=mid, host="h", version="2.0.0",
                        reason="health_check_failed", rolled_back=True)


async def test_release_rolls_batch_by_batch_to_success(releases, probe_factory):
    r, store = releases
    probe = await probe_factory("host.*.deploy", "kvm.#", "release.#")

    await r.request(release(), requested_by="release-bot")
    first = await probe.wait_for("deploy", count=2)
    await r.on_result(ok("m1"))
    await r.on_result(ok("m2"))
    await r.on_result(ok("m2"))  # a duplicate result advances nothing twice
    kvm = await probe.wait_for("kvm.deploy.requested")
    await r.on_result(ok("m3"))
    await r.on_result(ok("m4"))
    done = await probe.wait_for("release.succeeded")
    doc = await store.get("r1")

    assert sorted(m.machine_id for m in first) == ["m1", "m2"]
    assert [rk for rk, env in probe.received if env.type == "deploy"][:2] == [
        "host.h1.deploy", "host.h2.deploy"]
    assert len(probe.of_type("deploy")) == 3
    assert kvm[0].artifact == first[0].artifact
    assert (kvm[0].machine_id, kvm[0].ip) == ("m3", "10.9.0.13")
    assert (done[0].machines, doc["status"]) == (4, "succeeded")
    assert {m["status"] for m in doc["machines"].values()} == {"succeeded"}


async def test_each_deploy_carries_the_restart_or_the_reload_the_release_asks(
    releases, probe_factory
):
    r, _ = releases
    probe = await probe_factory("host.*.deploy", "kvm.#")

    await r.request(release("r-restart"), requested_by="ops")
    restart = await probe.wait_for("deploy", count=2)
    await r.request(release("r-reload", packaging="war", activate="reload"), requested_by="ops")
    reload = [d for d in await probe.wait_for("deploy", count=4) if d.release_id == "r-reload"]
    await r.on_result(ok("m1", "r-reload"))
    await r.on_result(ok("m2", "r-reload"))
    (kvm,) = await probe.wait_for("kvm.deploy.requested")

    assert {d.restart_command for d in restart} == {"/usr/local/sbin/dockvm-app restart"}
    assert {d.restart_command for d in reload} == {"/usr/local/sbin/dockvm-app reload"}
    assert (kvm.release_id, kvm.activate) == ("r-reload", "reload")  # a KVM machine reloads too


def test_a_reload_is_only_for_a_war():
    with pytest.raises(ValueError, match="packaging: war"):
        release(activate="reload")


async def test_failure_beyond_max_failures_stops_the_release(releases, probe_factory):
    r, store = releases
    probe = await probe_factory("host.*.deploy", "kvm.#", "release.#")

    await r.request(release(), requested_by="release-bot")
    await probe.wait_for("deploy", count=2)
    await r.on_result(ok("m1"))
    await r.on_result(bad("m2"))
    failed = await probe.wait_for("release.failed")
    doc = await store.get("r1")

    assert failed[0].failed_machines == ["m2"]
    assert doc["status"] == "failed"
    assert doc["machines"]["m2"]["rolled_back"] is True
    assert {doc["machines"][m]["status"] for m in ("m3", "m4")} == {"pending"}
    assert len(probe.of_type("deploy")) == 2
    assert probe.of_type("kvm.deploy.requested") == []


async def test_same_release_id_is_idempotent(releases, probe_factory):
    r, _ = releases
    probe = await probe_factory("host.*.deploy")

    a = await r.request(release(), requested_by="x")
    b = await r.request(release(), requested_by="x")
    await probe.wait_for("deploy", count=2)

    assert a["_id"] == b["_id"]
    assert len(probe.of_type("deploy")) == 2


@pytest.mark.parametrize(
    ("app", "error", "message"),
    [("nobody", NotFoundError, "unknown app"), ("empty", DomainError, "no running machines")],
)
async def test_bad_app_is_refused_and_nothing_is_stored(releases, app, error, message):
    r, store = releases

    with pytest.raises(error, match=message):
        await r.request(release(app=app), requested_by="x")
    assert await store.list() == []


async def test_restarted_gateway_resumes_and_times_out_silent_machines(
    mongo_db, publisher, releases, probe_factory
):
    r, store = releases
    probe = await probe_factory("host.*.deploy", "release.#")
    await r.request(release(batch_size=4), requested_by="x")
    await probe.wait_for("deploy", count=3)

    restarted = Releases(store, publisher, Directory({"demo": MACHINES}), deploy_timeout_s=0)
    await restarted.sweep()
    failed = await probe.wait_for("release.failed")

    assert failed[0].failed_machines == ["m1", "m2", "m3", "m4"]
    assert (await store.get("r1"))["machines"]["m1"]["reason"] == "timeout"


async def test_results_arriving_together_on_two_replicas_move_the_release_once(
    mongo_db, publisher, releases, probe_factory
):
    """FerretDB v1 loses one of two concurrent updates of a document: a batch's results,
    handled at once by two gateway replicas (two connections), must still both count."""
    r, _store = releases
    other = mongo_client(MONGO_URL, app_name="dockvm-tests-replica-2")
    try:
        store2 = ReleaseStore(other[mongo_db.name])
        r2 = Releases(store2, publisher, Directory({"demo": MACHINES}))
        probe = await probe_factory("host.*.deploy", "kvm.#", "release.#")
        await r.request(release(), requested_by="x")
        await probe.wait_for("deploy", count=2)

        await asyncio.gather(r.on_result(ok("m1")), r2.on_result(ok("m2")),
                             r2.on_result(ok("m2")))
        kvm = await probe.wait_for("kvm.deploy.requested")
        await asyncio.gather(r.on_result(ok("m3")), r2.on_result(ok("m4")),
                             r.on_result(ok("m4")))
        done = await probe.wait_for("release.succeeded")
        await asyncio.sleep(0.3)  # a second, wrong release.succeeded would arrive by now
        doc = await store2.get("r1")
    finally:
        await other.close()

    assert [k.machine_id for k in kvm] == ["m3"]
    assert len(probe.of_type("deploy")) == 3  # m1, m2, then m4: no batch sent twice
    assert len(done) == len(probe.of_type("release.succeeded")) == 1
    assert (doc["status"], doc["current_batch"]) == ("succeeded", 1)
    assert {m["status"] for m in doc["machines"].values()} == {"succeeded"}
