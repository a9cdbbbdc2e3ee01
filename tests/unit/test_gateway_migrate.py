"""The migrate saga on the in-memory store, publisher and clock: steps, refusals, switch back."""

from __future__ import annotations

import pytest

from libs.common.contracts import provisioner
from libs.common.errors import ConflictError, ValidationFailed
from services.gateway.service import SagaDriver
from services.gateway.service.migrate import IMPORT_TIMEOUT_FLOOR_S
from tests.unit.test_gateway_sagas import (
    GIB,
    Clock,
    _allocated,
    _create,
    _keys,
    clock,
    driver,
    pub,
    store,
)

__all__ = ["clock", "driver", "pub", "store"]  # fixtures, imported for pytest


async def _running(driver: SagaDriver, pub) -> tuple[str, str, str]:
    """A running machine: its id, its host and the other host."""
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    [host] = [k.split(".")[1] for k in _keys(pub, "container.create")]
    await driver.creates.on_created(mid, host, "c1")
    return mid, host, "h2" if host == "h1" else "h1"


def _beat(host: str, at) -> provisioner.HostHeartbeat:
    return provisioner.HostHeartbeat(
        host_id=host, dc="dc1", version="t", at=at,
        capacity=provisioner.Resources(cpus=2, memory=8 * GIB, disk=100 * GIB),
        allocated=provisioner.Resources(cpus=1, memory=GIB, disk=GIB))  # fmt: skip


def _sent(pub, type_: str) -> list:
    return [(key.split(".")[1], env) for key, env in pub.sent if env.type == type_]


async def test_a_migration_walks_export_import_finish_and_ends_running_on_the_target(
    driver, store, pub
):
    mid, source, target = await _running(driver, pub)
    doc, op_id = await driver.migrations.begin(mid, None)  # placement's choice: the other host
    [(to, export)] = _sent(pub, "machine.export")
    await driver.migrations.on_exported(
        provisioner.MachineExported(
            machine_id=mid, host=source, url="http://s/exports/m", disk=GIB, was_running=True
        )
    )
    [(imported_on, imp)] = _sent(pub, "machine.import")
    await driver.migrations.on_imported(
        provisioner.MachineImported(
            machine_id=mid, host=target, container_id="c2", state="running", bytes_copied=5 << 20
        )
    )
    moved = await store.get(mid)
    [(finished_on, end)] = _sent(pub, "machine.export_end")
    await driver.migrations.on_export_ended(
        provisioner.MachineExportEnded(
            machine_id=mid, host=source, outcome="moved", state="removed"
        )
    )
    done = await store.get(mid)

    assert doc["state"] == "migrating" and to == source
    assert export.data["token"] == imp.data["token"]  # one credential for both agents
    assert imported_on == target and imp.data["source_url"] == "http://s/exports/m"
    assert (imp.data["ip"], imp.data["hostname"]) == (doc["ip"], doc["hostname"])
    assert imp.data["start"] is True
    assert (moved["state"], moved["host"], moved["container_id"]) == ("migrating", target, "c2")
    assert (finished_on, end.data["outcome"]) == (source, "moved")
    assert (done["state"], done["host"], done["saga"]) == ("running", target, None)
    assert done["last_op"]["id"] == op_id and done["last_op"]["ok"] is True
    reasons = [t["reason"] for t in done["transitions"] if t["state"] == "migrating"]
    assert [r.split(" ")[0] for r in reasons] == ["migrating", "exported", "imported"]


async def test_a_failed_import_switches_back_to_the_source_and_ends_not_ok(driver, store, pub):
    mid, source, target = await _running(driver, pub)
    await driver.migrations.begin(mid, target)
    await driver.migrations.on_exported(
        provisioner.MachineExported(
            machine_id=mid, host=source, url="http://s/x", disk=GIB, was_running=True
        )
    )
    await driver.migrations.on_import_failed(
        provisioner.MachineImportFailed(
            machine_id=mid, host=target, reason="image_not_found: no such image"
        )
    )
    [(reverted_on, end)] = _sent(pub, "machine.export_end")
    await driver.migrations.on_export_ended(
        provisioner.MachineExportEnded(machine_id=mid, host=source, outcome="back", state="running")
    )
    done = await store.get(mid)

    assert (reverted_on, end.data["outcome"], end.data["start"]) == (source, "back", True)
    assert (done["state"], done["host"], done["saga"]) == ("running", source, None)
    assert done["last_op"]["ok"] is False
    assert done["last_op"]["reason"] == "import_failed"
    assert done["last_op"]["detail"].startswith(f"import_failed on {target}: image_not_found")
    assert "image_not_found" in done["reason"]


async def test_a_silent_import_tells_the_target_to_destroy_and_switches_back(
    driver, store, pub, clock: Clock
):
    mid, source, target = await _running(driver, pub)
    await driver.migrations.begin(mid, target)
    await driver.migrations.on_exported(
        provisioner.MachineExported(
            machine_id=mid, host=source, url="http://s/x", disk=GIB, was_running=False
        )
    )
    for _ in range(2):  # step_attempts=2: re-sent once (the target lives on), then given up
        clock.advance(IMPORT_TIMEOUT_FLOOR_S + 1)
        for host in (source, target):
            await driver.hosts.on_heartbeat(_beat(host, clock()))
        await driver.tick()
    doc = await store.get(mid)

    assert len(_sent(pub, "machine.import")) == 2
    assert [h for h, _ in _sent(pub, "container.destroy")] == [target]
    assert [(h, e.data["outcome"]) for h, e in _sent(pub, "machine.export_end")] == [
        (source, "back")
    ]
    assert (doc["state"], doc["saga"]["step"], doc["host"]) == ("migrating", "revert", source)


@pytest.mark.parametrize(
    ("target", "error", "reason"),
    [("h9", ValidationFailed, "unknown_host"), (None, None, "same_host")],
)
async def test_a_refused_migration_changes_nothing(driver, store, pub, target, error, reason):
    mid, source, _ = await _running(driver, pub)
    before = await store.get(mid)
    with pytest.raises(ValidationFailed) as raised:
        await driver.migrations.begin(mid, target or source)
    after = await store.get(mid)

    assert raised.value.reason == reason
    assert after["state"] == "running" and after["saga"] is None
    assert after["transitions"] == before["transitions"]
    assert _sent(pub, "machine.export") == []


async def test_a_drained_target_and_a_busy_or_stopped_machine_are_conflicts(driver, store, pub):
    mid, _, target = await _running(driver, pub)
    await driver.store.drains.drain(target, "ops", driver.clock())
    with pytest.raises(ConflictError) as drained:
        await driver.migrations.begin(mid, target)
    with pytest.raises(ConflictError) as nowhere:
        await driver.migrations.begin(mid, None)
    await driver.store.drains.undrain(target)
    await driver.begin_resize(mid, 2.0, None, None, False)
    with pytest.raises(ConflictError) as busy:
        await driver.migrations.begin(mid, target)

    assert drained.value.reason == "host_unavailable"
    assert nowhere.value.reason == "no_capacity"
    assert busy.value.reason == "machine_busy"


async def test_a_migrating_machine_stays_in_its_hosts_known_list(driver, pub):
    mid, source, target = await _running(driver, pub)
    await driver.migrations.begin(mid, target)
    driver.hosts.cluster_id = "c1"
    await driver.hosts.announce_known()
    known = {host: env.data["machine_ids"] for host, env in _sent(pub, "machines.known")}

    assert mid in known[source] and mid not in known[target]


async def test_a_target_that_died_is_given_up_on_at_the_first_resend(driver, store, pub, clock):
    mid, source, target = await _running(driver, pub)
    await driver.migrations.begin(mid, target)
    await driver.migrations.on_exported(provisioner.MachineExported(
        machine_id=mid, host=source, url="http://s/x", disk=GIB, was_running=True))
    clock.advance(IMPORT_TIMEOUT_FLOOR_S + 1)  # the target's heartbeats stopped long ago
    await driver.hosts.on_heartbeat(_beat(source, clock()))
    await driver.tick()
    doc = await store.get(mid)

    assert len(_sent(pub, "machine.import")) == 1  # not re-sent to a dead host
    assert [h for h, _ in _sent(pub, "container.destroy")] == [target]
    assert (doc["saga"]["step"], doc["host"]) == ("revert", source)

