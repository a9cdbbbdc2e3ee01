"""Orphans: the pure decisions (which list counts, whose a container is, how many one sweep may
quarantine, when retention deletes), then the agent's quarantine, release and purge on in-memory
fakes, with both clocks moved by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from libs.common.bus import MemoryPublisher
from libs.common.contracts.provisioner import MachinesKnown, OrphanPurge
from libs.common.errors import TransientError
from services.provisioner.adapters import BridgeNetwork
from services.provisioner.domain import (
    LABEL_CLUSTER,
    LABEL_HOST,
    ListVerdict,
    OrphanTracker,
    Ownership,
    QuarantineRecord,
    admit_list,
    build_spec,
    expired,
    ownership,
    plan_sweep,
)
from services.provisioner.fakes import MemoryRuntime, MemoryVolumes
from services.provisioner.orphans import OrphanBook
from services.provisioner.service import AgentConfig, ProvisionerService
from services.provisioner.upkeep import HostUpkeep
from tests.unit.test_provisioner_service import Clock, _create, _send

G = 1 << 30
T0 = datetime(2026, 11, 1, tzinfo=UTC)

# ---- pure decisions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adopted", "incoming", "verdict"),
    [
        (None, "c1", ListVerdict.ADOPT),
        ("c1", "c1", ListVerdict.ACCEPT),
        ("c1", "c2", ListVerdict.FOREIGN),
        ("c1", None, ListVerdict.ANONYMOUS),
        (None, None, ListVerdict.ANONYMOUS),
    ],
)
def test_only_the_adopted_clusters_lists_count(adopted, incoming, verdict):
    assert admit_list(adopted, incoming) is verdict


@pytest.mark.parametrize(
    ("labels", "cluster", "has_disk", "owner"),
    [
        ({LABEL_HOST: "h1", LABEL_CLUSTER: "c1"}, "c1", False, Ownership.MINE),
        ({LABEL_HOST: "h1"}, "c1", False, Ownership.MINE),  # made before it heard a cluster
        ({LABEL_HOST: "h1", LABEL_CLUSTER: "c1"}, None, False, Ownership.MINE),
        ({LABEL_HOST: "h1", LABEL_CLUSTER: "c2"}, "c1", True, Ownership.FOREIGN),
        ({LABEL_HOST: "h2", LABEL_CLUSTER: "c1"}, "c1", True, Ownership.FOREIGN),
        ({}, "c1", True, Ownership.LEGACY),
        ({}, "c1", False, Ownership.FOREIGN),
    ],
)
def test_whose_a_container_is(labels, cluster, has_disk, owner):
    assert ownership(labels, "h1", cluster, has_disk=has_disk) is owner


@pytest.mark.parametrize(
    ("due", "present", "quarantined", "refused"),
    [
        (["a"], 1, ("a",), False),  # a lone machine may be an orphan
        (["a", "b"], 4, ("a", "b"), False),
        (["a", "b", "c"], 4, (), True),  # 3 of 4 is more than half
        ([f"m{i}" for i in range(6)], 100, (), True),  # past the cap of 5
        ([f"m{i}" for i in range(5)], 100, tuple(f"m{i}" for i in range(5)), False),
        ([], 0, (), False),
    ],
)
def test_a_sweep_quarantines_all_due_or_none_past_the_cap(due, present, quarantined, refused):
    plan = plan_sweep(due, present, cap=5, fraction=0.5)

    assert plan.quarantine == quarantined
    assert (plan.refused is not None) is refused


def test_retention_deletes_only_records_older_than_it():
    old = QuarantineRecord("old", "c1", True, T0)
    new = QuarantineRecord("new", None, False, T0 + timedelta(days=6))

    assert expired([old, new], T0 + timedelta(days=7), 7 * 86400) == ["old"]
    assert old.purge_after(86400) == T0 + timedelta(days=1)


def test_a_machine_is_known_only_once_a_list_names_it():
    t = OrphanTracker(grace_s=0)
    before = t.is_known("a")
    t.update_known(["a"], now=0)

    assert (before, t.is_known("a"), t.is_known("b")) == (False, True, False)


def test_the_book_keeps_the_cluster_and_records_across_a_restart(tmp_path):
    book = OrphanBook(tmp_path)
    book.adopt("c1")
    book.put(QuarantineRecord("m1", "cid", True, T0, "c1"))
    book.put(QuarantineRecord("m2", None, False, T0, "c1"))
    book.drop("m2")

    again = OrphanBook(tmp_path)

    assert again.cluster_id == "c1"
    assert again.records() == [QuarantineRecord("m1", "cid", True, T0, "c1")]


def test_an_unreadable_record_is_skipped_not_fatal(tmp_path):
    OrphanBook(tmp_path).put(QuarantineRecord("m1", None, False, T0))
    (tmp_path / "quarantine" / "m2.json").write_text("{half a reco")

    assert [r.machine_id for r in OrphanBook(tmp_path).records()] == ["m1"]


# ---- the agent -------------------------------------------------------------------------------


class Wall:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def parts(tmp_path):
    runtime = MemoryRuntime(cpus=4, memory=8 * G)
    volumes = MemoryVolumes(total=100 * G)
    publisher = MemoryPublisher()
    clock, wall = Clock(), Wall()
    config = AgentConfig(
        host_id="h1", dc="dc1", lxcfs_path=Path("/nonexistent/lxcfs"), orphan_grace_s=10,
        orphan_retention_s=86400, orphan_sweep_cap=2, orphans_dir=tmp_path / "orphans",
    )  # fmt: skip
    agent = ProvisionerService(
        config, runtime, BridgeNetwork(runtime, "dockvm"), volumes, publisher, clock
    )
    agent.orphans.wall_clock = wall
    return agent, runtime, volumes, publisher, clock, wall


async def _machines(agent, publisher, *mids: str) -> None:
    for n, mid in enumerate(mids):
        await _send(agent, publisher, _create(mid, ip=f"10.9.0.{10 + n}"))


async def _known(agent, publisher, *mids: str, cluster: str | None = "c1") -> None:
    await _send(agent, publisher, MachinesKnown(machine_ids=list(mids), cluster_id=cluster))


async def _past_grace(agent, publisher, clock, *known: str) -> None:
    """A sweep that notes the orphans, then a fresh list and a sweep past the grace period."""
    upkeep = HostUpkeep(agent)
    await _known(agent, publisher, *known)
    clock.now += 1
    await upkeep.reconcile()
    clock.now += 20
    await _known(agent, publisher, *known)
    await upkeep.reconcile()


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_an_orphan_is_quarantined_stopped_with_its_disk_kept(parts):
    agent, runtime, volumes, publisher, clock, _ = parts
    await _machines(agent, publisher, "m1", "m2")

    await _past_grace(agent, publisher, clock, "m1")

    quarantined = publisher.of_type("container.quarantined")
    assert [q.machine_id for q in quarantined] == ["m2"]
    assert quarantined[0].was_running and quarantined[0].purge_after == T0 + timedelta(days=1)
    assert runtime.containers["m2"].info.state == "exited"
    assert runtime.containers["m1"].info.state == "running"
    assert set(volumes.sizes) == {"m1", "m2"}
    assert publisher.of_type("container.destroyed") == []
    assert (agent.config.orphans_dir / "quarantine" / "m2.json").exists()


async def test_a_quarantined_machine_named_again_runs_again(parts):
    agent, runtime, _, publisher, clock, _ = parts
    await _machines(agent, publisher, "m1", "m2")
    await _past_grace(agent, publisher, clock, "m1")

    await _known(agent, publisher, "m1", "m2")
    await HostUpkeep(agent).reconcile()

    released = publisher.of_type("container.unquarantined")
    assert [(r.machine_id, r.started) for r in released] == [("m2", True)]
    assert runtime.containers["m2"].info.state == "running"
    assert not agent.orphans.is_quarantined("m2")


async def test_a_purge_deletes_a_quarantined_machine_and_refuses_any_other(parts):
    agent, runtime, volumes, publisher, clock, _ = parts
    await _machines(agent, publisher, "m1", "m2")
    await _past_grace(agent, publisher, clock, "m1")

    refused = await _send(agent, publisher, OrphanPurge(machine_id="m1"))
    purged = await _send(agent, publisher, OrphanPurge(machine_id="m2"))
    again = await _send(agent, publisher, OrphanPurge(machine_id="m2"))

    assert (refused.TYPE, refused.reason) == ("orphan.purge_refused", "not_quarantined")
    assert (purged.TYPE, purged.reason) == ("container.destroyed", "orphan")
    assert purged.machine_id == "m2"
    assert again.TYPE == "orphan.purge_refused"
    assert list(runtime.containers) == ["m1"] and list(volumes.sizes) == ["m1"]


async def test_a_purge_still_queued_past_its_deadline_is_refused(parts):
    agent, runtime, _, publisher, clock, wall = parts
    await _machines(agent, publisher, "m1", "m2")
    await _past_grace(agent, publisher, clock, "m1")
    wall.now = T0 + timedelta(minutes=5)

    late = await _send(agent, publisher, OrphanPurge(machine_id="m2", deadline=T0))

    assert (late.TYPE, late.reason) == ("orphan.purge_refused", "expired")
    assert agent.orphans.is_quarantined("m2") and "m2" in runtime.containers


async def test_retention_deletes_a_quarantined_machine(parts):
    agent, runtime, volumes, publisher, clock, wall = parts
    await _machines(agent, publisher, "m1", "m2")
    await _past_grace(agent, publisher, clock, "m1")
    upkeep = HostUpkeep(agent)

    wall.now = T0 + timedelta(hours=23)
    await upkeep.reconcile()
    kept = set(runtime.containers)
    wall.now = T0 + timedelta(days=1)
    await upkeep.reconcile()

    assert kept == {"m1", "m2"}
    assert [(d.machine_id, d.reason) for d in publisher.of_type("container.destroyed")] == [
        ("m2", "orphan")
    ]
    assert list(runtime.containers) == ["m1"] and list(volumes.sizes) == ["m1"]


async def test_past_the_cap_a_sweep_quarantines_none_and_raises_an_alert(parts):
    agent, runtime, _, publisher, clock, _ = parts
    await _machines(agent, publisher, "m1", "m2", "m3", "m4", "m5", "m6")
    refused_before = _metric("dockvm_provisioner_orphan_sweeps_refused_total", host="h1")

    await _past_grace(agent, publisher, clock, "m1", "m2", "m3")  # 3 due, the cap is 2

    alerts = publisher.of_type("host.alert")
    assert [(a.reason, a.count, a.cleared) for a in alerts] == [("orphan_sweep_capped", 3, False)]
    assert publisher.of_type("container.quarantined") == []
    assert all(c.info.state == "running" for c in runtime.containers.values())
    assert _metric("dockvm_provisioner_orphan_sweeps_refused_total", host="h1") == (
        refused_before + 1
    )


async def test_lists_of_another_cluster_or_of_none_are_ignored(parts):
    agent, _, _, publisher, clock, _ = parts
    await _machines(agent, publisher, "m1", "m2")
    await _known(agent, publisher, "m1", "m2")  # joins c1
    upkeep = HostUpkeep(agent)
    ignored = "dockvm_provisioner_known_lists_ignored_total"
    before = _metric(ignored, host="h1", verdict="foreign")

    for _ in range(2):
        await _known(agent, publisher, cluster="staging")
        await _known(agent, publisher, cluster=None)
        clock.now += 20
        await upkeep.reconcile()

    assert agent.orphans.cluster_id == "c1"
    assert publisher.of_type("container.quarantined") == []
    assert not any(o.orphan for o in publisher.of_type("container.observed"))
    assert [a.reason for a in publisher.of_type("host.alert")] == ["foreign_cluster"] * 2
    assert _metric(ignored, host="h1", verdict="foreign") == before + 2


async def test_containers_carry_their_host_and_the_adopted_cluster(parts):
    agent, runtime, _, publisher, _, _ = parts
    await _machines(agent, publisher, "before")
    await _known(agent, publisher, "before")
    await _send(agent, publisher, _create("after", ip="10.9.0.30"))

    before = runtime.containers["before"].info.labels
    after = runtime.containers["after"].info.labels

    assert (before[LABEL_HOST], before.get(LABEL_CLUSTER)) == ("h1", None)
    assert (after[LABEL_HOST], after[LABEL_CLUSTER]) == ("h1", "c1")


def _foreign_spec(mid: str, **owner: str | None):
    return build_spec(
        _create(mid, ip="10.9.0.99"), data_path="/x", network="none", static_ip=False,
        lxcfs_root=None, **owner,
    )  # fmt: skip


@pytest.mark.parametrize(
    "owner",
    [{"host_id": "h2", "cluster_id": "c1"}, {"host_id": "h1", "cluster_id": "other"}, {}],
    ids=["another-host", "another-cluster", "legacy-without-a-disk-here"],
)
async def test_another_agents_container_on_the_engine_is_never_touched(parts, owner):
    agent, runtime, _, publisher, clock, _ = parts
    await _machines(agent, publisher, "m1")
    await runtime.create(_foreign_spec("theirs", **owner))
    await runtime.start("theirs")

    await _past_grace(agent, publisher, clock, "m1")
    beat = await HostUpkeep(agent).heartbeat()

    assert runtime.containers["theirs"].info.state == "running"
    assert publisher.of_type("container.quarantined") == []
    assert "theirs" not in {o.machine_id for o in publisher.of_type("container.observed")}
    assert beat.machines == 1


async def test_a_legacy_container_with_its_disk_here_is_reported_but_never_quarantined(parts):
    agent, runtime, volumes, publisher, clock, _ = parts
    await _machines(agent, publisher, "m1")
    await volumes.ensure("old", G)
    await runtime.create(_foreign_spec("old"))
    await runtime.start("old")

    await _past_grace(agent, publisher, clock, "m1")

    observed = {o.machine_id: o.orphan for o in publisher.of_type("container.observed")}
    assert observed["old"] is True
    assert runtime.containers["old"].info.state == "running"
    assert publisher.of_type("container.quarantined") == []


async def test_a_disk_without_a_container_is_quarantined_not_deleted(parts):
    agent, _, volumes, publisher, clock, _ = parts
    await _machines(agent, publisher, "m1")
    await volumes.ensure("left-over", G)

    await _past_grace(agent, publisher, clock, "m1")

    quarantined = publisher.of_type("container.quarantined")
    assert [(q.machine_id, q.container_id, q.was_running) for q in quarantined] == [
        ("left-over", None, False)
    ]
    assert "left-over" in volumes.sizes


async def test_a_restarted_agent_keeps_its_cluster_and_its_quarantine(parts):
    agent, runtime, volumes, publisher, clock, _ = parts
    await _machines(agent, publisher, "m1", "m2")
    await _past_grace(agent, publisher, clock, "m1")

    restarted = ProvisionerService(
        agent.config, runtime, BridgeNetwork(runtime, "dockvm"), volumes, publisher, clock
    )
    await _known(restarted, publisher, cluster="c2")

    assert restarted.orphans.cluster_id == "c1"
    assert restarted.orphans.is_quarantined("m2")
    assert [a.reason for a in publisher.of_type("host.alert")] == ["foreign_cluster"]


async def test_a_quarantine_whose_stop_fails_is_not_recorded_and_is_tried_again(parts):
    agent, runtime, _, publisher, clock, _ = parts
    await _machines(agent, publisher, "m1", "m2")
    stop = runtime.stop

    async def failing(machine_id: str, timeout_s: int):
        raise TransientError("docker engine unreachable")

    runtime.stop = failing  # type: ignore[method-assign]
    await _past_grace(agent, publisher, clock, "m1")
    recorded = agent.orphans.is_quarantined("m2")
    runtime.stop = stop  # type: ignore[method-assign]
    await _known(agent, publisher, "m1")
    await HostUpkeep(agent).reconcile()

    assert recorded is False
    assert [q.machine_id for q in publisher.of_type("container.quarantined")] == ["m2"]
    assert runtime.containers["m2"].info.state == "exited"
