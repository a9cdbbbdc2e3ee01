"""Orphans on the real stack: an agent told a list of known machines quarantines only its own
orphans (stopped, disk kept), deletes one only on a purge, refuses a sweep past its cap, follows
one cluster across a restart; and the gateway shows and purges what an agent quarantined.

Every test runs beside machines it must not touch on the same Docker engine, as `make run` and
other suites do: another agent's machine (another host id, vhost and state dir), a container
labelled as this host's but of another cluster, and one made before the labels (no host label,
no disk here). They must end running, their disks in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import docker.errors
import pytest

from libs.common.bus import connect, host_key
from libs.common.contracts.provisioner import (
    ContainerCreate,
    ContainerQuarantined,
    HostAlert,
    MachinesKnown,
    OrphanPurge,
)
from services.gateway.cluster import ClusterStore
from services.gateway.quarantine import QuarantineStore
from services.gateway.service.hosts import HostReports
from services.provisioner.domain import LABEL_CLUSTER, LABEL_HOST
from tests.integration.test_provisioner import (
    IMAGE,
    PREFIX,
    RUN,
    Agent,
    _agent,
    _cleanup,
    _docker,
    _loops_of,
    create_cmd,
)
from tests.support.probe import BusProbe

CLUSTER = f"c{RUN}"
ORPHAN_ENV = {"DOCKVM_RECONCILE_INTERVAL_S": "0.5", "DOCKVM_ORPHAN_GRACE_S": "1"}


def _net(n: int) -> dict[str, object]:
    """A VLAN and subnet of this module's own (test_provisioner uses 3101-3120)."""
    return {"vlan_id": 3140 + n, "gateway": f"10.231.{40 + n}.1"}


async def _machine(agent: Agent, n: int, host: int = 5) -> str:
    """A running machine of ``agent`` on VLAN ``n``."""
    mid = agent.machine_id()
    result = await agent.create(mid, ip=f"10.231.{40 + n}.{host}", **_net(n))
    assert result.TYPE == "container.created", result
    return mid


def _state(mid: str) -> str | None:
    """The container's state, or None when there is none."""
    client = _docker()
    try:
        return client.api.inspect_container(f"dockvm-{mid}")["State"]["Status"]
    except docker.errors.NotFound:
        return None
    finally:
        client.close()


def _mounted(path: Path) -> bool:
    return subprocess.run(["findmnt", "-n", str(path)], capture_output=True).returncode == 0


@contextlib.asynccontextmanager
async def _probe(agent: Agent, *bindings: str) -> AsyncIterator[BusProbe]:
    """A probe on the agent's vhost for what its own probe does not bind."""
    conn = await connect(agent.env["DOCKVM_AMQP_URL"], name="dockvm-tests-orphans")
    try:
        probe = await BusProbe(conn, list(bindings)).start()
        yield probe
        await probe.close()
    finally:
        await conn.close()


async def _tell_until(agent: Agent, known: MachinesKnown, done, timeout: float = 60) -> None:
    """Send ``known`` every 0.5 s, as the gateway does, until ``done()``."""
    async with asyncio.timeout(timeout):
        while not done():
            await agent.send(known)
            await asyncio.sleep(0.5)


@pytest.fixture
async def orphan_agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """The suite's orphan agent: a 1 s grace period, a reconcile every 0.5 s."""
    (tmp_path / "a").mkdir()
    async for a in _agent(tmp_path / "a", **ORPHAN_ENV):
        yield a


@pytest.fixture
async def neighbour(tmp_path: Path) -> AsyncIterator[Agent]:
    """Another agent on the same engine: another host id, vhost, database and state dir."""
    (tmp_path / "b").mkdir()
    async for a in _agent(tmp_path / "b"):
        yield a


@pytest.fixture
def strangers() -> Iterator[Callable[[str], list[str]]]:
    """Make containers on the engine beside an agent of ``host_id`` that it did not make: one
    labelled with its host but another cluster, one made before the labels (no host label, no
    disk under its state dir). Removed afterwards."""
    client = _docker()
    made: list[str] = []

    def make(host_id: str) -> list[str]:
        mids = []
        for n, extra in enumerate([{LABEL_HOST: host_id, LABEL_CLUSTER: "another-cluster"}, {}]):
            mid = f"{PREFIX}-stranger{n}-{uuid.uuid4().hex[:6]}"
            c = client.api.create_container(
                IMAGE, name=f"dockvm-{mid}", detach=True,
                labels={"dockvm.machine_id": mid, **extra},
                host_config=client.api.create_host_config(network_mode="none"),
            )  # fmt: skip
            made.append(c["Id"])
            client.api.start(c["Id"])
            mids.append(mid)
        return mids

    yield make
    for cid in made:
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(cid, force=True)
    client.close()


async def test_the_orphan_scenario_quarantines_only_its_own_and_a_purge_deletes_it(
    orphan_agent, neighbour, strangers
):
    agent = orphan_agent
    others = strangers(agent.host_id)
    theirs = await _machine(neighbour, 9)
    kept, orphan = await _machine(agent, 0, 5), await _machine(agent, 0, 6)
    known = MachinesKnown(machine_ids=[kept], cluster_id=CLUSTER)

    await _tell_until(agent, known, lambda: agent.probe.of_type("container.quarantined"))
    adopted = len(agent.probe.of_type("container.observed"))
    await asyncio.sleep(2)  # several more sweeps with the same list: nothing else may move
    quarantined = agent.probe.of_type("container.quarantined")
    after_quarantine = {mid: _state(mid) for mid in (kept, orphan, theirs, *others)}
    image = agent.state / "volumes" / f"{orphan}.img"
    kept_disk = image.exists() and _mounted(agent.state / "volumes" / "mnt" / orphan)

    await agent.send(OrphanPurge(machine_id=orphan))
    destroyed = await agent.wait(("container.destroyed",), orphan)
    observed = [o.machine_id for o in agent.probe.of_type("container.observed")]

    assert {q.machine_id for q in quarantined} == {orphan}
    assert quarantined[0].was_running and quarantined[0].cluster_id == CLUSTER
    assert after_quarantine == dict.fromkeys((kept, theirs, *others), "running") | {
        orphan: "exited"
    }
    assert kept_disk
    assert destroyed[0].reason == "orphan"
    assert _state(orphan) is None and not image.exists()
    assert not any(orphan in loop for loop in _loops_of(agent.state))
    # Another host's machine and one of no host were never even reported; one of this host
    # but another cluster only until the agent knew its own cluster.
    assert set(observed) <= {kept, orphan, others[0]}
    assert set(observed[adopted:]) == {kept, orphan}
    assert {mid: _state(mid) for mid in (kept, theirs, *others)} == dict.fromkeys(
        (kept, theirs, *others), "running"
    )
    assert (neighbour.state / "volumes" / f"{theirs}.img").exists()
    assert _mounted(neighbour.state / "volumes" / "mnt" / theirs)


async def test_a_quarantined_machine_named_again_runs_again_and_a_purge_of_it_is_refused(
    orphan_agent,
):
    agent = orphan_agent
    kept, orphan = await _machine(agent, 1, 5), await _machine(agent, 1, 6)

    await _tell_until(
        agent,
        MachinesKnown(machine_ids=[kept], cluster_id=CLUSTER),
        lambda: agent.probe.of_type("container.quarantined"),
    )
    await _tell_until(
        agent,
        MachinesKnown(machine_ids=[kept, orphan], cluster_id=CLUSTER),
        lambda: agent.probe.of_type("container.unquarantined"),
    )
    released = agent.probe.of_type("container.unquarantined")
    async with _probe(agent, "orphan.#") as probe:
        await agent.send(OrphanPurge(machine_id=orphan))
        refused = await probe.wait_for("orphan.purge_refused")

    assert [(r.machine_id, r.started) for r in released] == [(orphan, True)]
    assert _state(orphan) == "running" and _state(kept) == "running"
    assert refused[0].reason == "not_quarantined"
    assert (agent.state / "volumes" / f"{orphan}.img").exists()


@pytest.fixture
async def capped_agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """An orphan agent that may quarantine one machine per sweep."""
    async for a in _agent(tmp_path, DOCKVM_ORPHAN_SWEEP_CAP="1", **ORPHAN_ENV):
        yield a


async def test_past_the_cap_a_sweep_quarantines_none_alerts_and_counts(capped_agent, strangers):
    agent = capped_agent
    others = strangers(agent.host_id)
    a, b = await _machine(agent, 2, 5), await _machine(agent, 2, 6)

    async with _probe(agent, "host.alert") as alerts:
        await _tell_until(
            agent,
            MachinesKnown(machine_ids=[], cluster_id=CLUSTER),
            lambda: alerts.of_type("host.alert"),
        )
        alert = alerts.of_type("host.alert")[0]
    await agent.wait(("container.observed",), a, count=6)  # sweeps go on, still refused
    async with aiohttp.ClientSession() as s, s.get(f"{agent.proc.url}/metrics") as r:
        metrics = await r.text()

    assert (alert.reason, alert.count, alert.cleared) == ("orphan_sweep_capped", 2, False)
    assert agent.probe.of_type("container.quarantined") == []
    assert [_state(mid) for mid in (a, b, *others)] == ["running"] * 4
    refused = f'dockvm_provisioner_orphan_sweeps_refused_total{{host="{agent.host_id}"}}'
    assert any(line.startswith(refused) and float(line.split()[-1]) >= 1
               for line in metrics.splitlines())  # fmt: skip


async def test_the_cluster_survives_a_restart_and_another_clusters_list_is_ignored(orphan_agent):
    agent = orphan_agent
    mid = await _machine(agent, 3)
    ours = MachinesKnown(machine_ids=[mid], cluster_id=CLUSTER)
    id_file = agent.state / "orphans" / "cluster_id"
    await _tell_until(agent, ours, id_file.exists, timeout=10)

    agent.proc.kill()
    await agent.proc.proc.wait()
    await agent.start()
    staging = MachinesKnown(machine_ids=[], cluster_id="staging-gateway")
    async with _probe(agent, "host.alert") as alerts:
        await _tell_until(agent, staging, lambda: alerts.of_type("host.alert"))
        alert = alerts.of_type("host.alert")[0]
    seen = len(agent.probe.of_type("container.observed"))
    # Many sweeps past the grace period, with only the foreign list heard since the restart.
    await _tell_until(
        agent, staging, lambda: len(agent.probe.of_type("container.observed")) >= seen + 6
    )

    assert id_file.read_text().strip() == CLUSTER
    assert (alert.reason, alert.cleared) == ("foreign_cluster", False)
    assert "staging-gateway" in alert.detail
    assert agent.probe.of_type("container.quarantined") == []
    assert not any(o.orphan for o in agent.probe.of_type("container.observed"))
    assert _state(mid) == "running"


# ---- the gateway: GET /v1/hosts/{id} and the purge route -----------------------------------


@pytest.fixture
async def stack(start_service, service_env, tmp_path) -> AsyncIterator[tuple]:
    """A gateway on an empty database and an orphan agent on the same vhost and database."""
    host = f"h-{uuid.uuid4().hex[:8]}"
    state = Path(service_env["DOCKVM_STATE_DIR"])
    gateway = await start_service("gateway", env={"DOCKVM_KNOWN_ANNOUNCE_S": "0.5"})
    agent_env = {**ORPHAN_ENV, "DOCKVM_NETWORK_PREFIX": PREFIX, "DOCKVM_STOP_TIMEOUT_S": "5",
                 "DOCKVM_HEARTBEAT_INTERVAL_S": "0.5"}  # fmt: skip
    agent = await start_service("provisioner", "--host-id", host, env=agent_env)
    token = (state / "admin.token").read_text().strip()
    client = _docker()
    try:
        async with aiohttp.ClientSession(
            gateway.url, headers={"Authorization": f"Bearer {token}"}
        ) as api:
            yield api, host, agent
    finally:
        agent.kill()
        if agent.proc is not None:
            await agent.proc.wait()
        _cleanup(client, state, PREFIX)
        client.close()


async def _host(api: aiohttp.ClientSession, host: str) -> dict:
    async with api.get(f"/v1/hosts/{host}") as r:
        return {"http": r.status, **(await r.json())}


async def test_the_gateway_shows_a_quarantined_machine_and_purges_it(stack, publisher, amqp):
    api, host, _ = stack
    probe = await BusProbe(amqp, ["container.#"]).start()
    mid = f"{PREFIX}-{uuid.uuid4().hex[:8]}"
    cmd: ContainerCreate = create_cmd(mid, ip="10.231.44.5", **_net(4))
    # Made behind the gateway's back: it holds no machine on this host, so it is an orphan.
    await publisher.publish(cmd, routing_key=host_key(host, cmd.TYPE))
    await probe.wait_for("container.created", lambda m: m.machine_id == mid, timeout=60)

    async with asyncio.timeout(60):
        while not (shown := await _host(api, host)).get("quarantined"):
            await asyncio.sleep(0.3)
    async with api.post(f"/v1/hosts/{host}/orphans/nosuch/purge") as r:
        unknown_orphan = r.status
    async with api.post(f"/v1/hosts/nosuch-host/orphans/{mid}/purge") as r:
        unknown_host = r.status
    async with api.get("/v1/hosts/nosuch-host") as r:
        no_such_host = r.status
    async with api.post(f"/v1/hosts/{host}/orphans/{mid}/purge") as r:
        purged = (r.status, await r.json())
    after = await _host(api, host)
    async with api.get("/v1/audit") as r:
        audit = [e for e in (await r.json())["items"] if e["path"].endswith("/purge")]
    await probe.close()

    assert (shown["http"], shown["id"], shown["status"]) == (200, host, "online")
    assert [(q["machine_id"], q["was_running"]) for q in shown["quarantined"]] == [(mid, True)]
    assert shown["quarantined"][0]["purge_after"] > shown["quarantined"][0]["quarantined_at"]
    assert (unknown_orphan, unknown_host, no_such_host) == (404, 404, 404)
    assert purged == (200, {"host": host, "machine_id": mid, "status": "purged"})
    assert after["quarantined"] == []
    assert _state(mid) is None
    assert {(e["status"], e["target"]) for e in audit} >= {(200, f"{host}/{mid}")}


# ---- the gateway's stores on FerretDB ------------------------------------------------------


async def test_gateways_starting_at_once_on_an_empty_database_agree_on_one_cluster_id(mongo_db):
    ids = await asyncio.gather(*(ClusterStore(mongo_db).ensure() for _ in range(8)))
    again = await ClusterStore(mongo_db).ensure()

    assert len(set(ids)) == 1
    assert again == ids[0]


def _quarantined(mid: str, at: datetime) -> ContainerQuarantined:
    return ContainerQuarantined(host="h1", machine_id=mid, container_id=f"c-{mid}",
                                was_running=True, quarantined_at=at,
                                purge_after=at + timedelta(days=7))  # fmt: skip


async def test_a_repeat_handled_after_the_end_of_a_quarantine_does_not_bring_it_back(mongo_db):
    reports = HostReports(QuarantineStore(mongo_db))
    t = [datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=s) for s in range(6)]
    for mid in ("m1", "m2", "m3"):
        await reports.on_quarantined(_quarantined(mid, t[0]))
    await reports.on_ended("h1", "m1", "purged", t[3])
    await reports.on_ended("h1", "m2", "released", t[3])
    # Repeats published before the end, handled after it (events are handled concurrently).
    await reports.on_quarantined(_quarantined("m1", t[0]))
    await reports.on_quarantined(_quarantined("m2", t[0]))
    # m3 is released, then quarantined again later: that one counts.
    await reports.on_ended("h1", "m3", "released", t[2])
    await reports.on_quarantined(_quarantined("m3", t[4]))
    await reports.on_quarantined(_quarantined("m3", t[4]))  # and its repeat

    shown = await reports.store.quarantined("h1")

    assert [(d["machine_id"], d["quarantined_at"]) for d in shown] == [("m3", t[4])]
    assert await reports.store.quarantined("h2") == []


async def test_a_repeat_racing_the_end_of_its_quarantine_never_brings_it_back(mongo_db):
    reports = HostReports(QuarantineStore(mongo_db))
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    await reports.on_quarantined(_quarantined("m1", t0))

    for n in range(1, 6):
        await asyncio.gather(
            *(reports.on_quarantined(_quarantined("m1", t0)) for _ in range(4)),
            reports.on_ended("h1", "m1", "purged", t0 + timedelta(seconds=n)),
        )

    assert await reports.store.quarantined("h1") == []


async def test_an_alert_shows_until_it_is_cleared(mongo_db):
    reports = HostReports(QuarantineStore(mongo_db))
    at = datetime(2026, 11, 1, tzinfo=UTC)

    def alert(reason: str, s: int, cleared: bool = False) -> HostAlert:
        return HostAlert(host="h1", reason=reason, detail=f"{reason} {s}", count=s,
                         cleared=cleared, at=at + timedelta(seconds=s))  # fmt: skip

    await reports.on_alert(alert("orphan_sweep_capped", 1))
    await reports.on_alert(alert("foreign_cluster", 1))
    await reports.on_alert(alert("orphan_sweep_capped", 3, cleared=True))
    await reports.on_alert(alert("orphan_sweep_capped", 2))  # older than the clearing: ignored

    shown = await reports.store.alerts_of("h1")

    assert [(a["reason"], a["count"]) for a in shown] == [("foreign_cluster", 1)]
