"""The chaos suite's cheap cases: one round of each scenario that does not restart shared
infrastructure (``make chaos`` runs every scenario, full rounds), on one private stack, and
the suite's own checks shown to catch what they look for.

The RabbitMQ, FerretDB and dockerd restarts are not here: they would disturb every other test.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import docker
import pytest

from chaos.checks import audit
from chaos.scenarios import SCENARIOS, Params, Scenario
from chaos.stack import IMAGE, ChaosStack, remove_engine_traces
from chaos.suite import select

CHEAP = [s for s in SCENARIOS if not s.disruptive]


@pytest.fixture(scope="module")
async def chaos_stack() -> AsyncIterator[tuple[ChaosStack, Params]]:
    """One private stack for the module, and small sizes (one round each must fit ~3 min)."""
    stack = ChaosStack()
    try:
        await stack.start()
        yield stack, Params(batch=4, pushes=8, settle_s=180)
    finally:
        await stack.close()


@pytest.mark.parametrize("scenario", CHEAP, ids=[s.name for s in CHEAP])
async def test_one_round_holds(chaos_stack: tuple[ChaosStack, Params], scenario: Scenario):
    stack, params = chaos_stack
    if reason := scenario.unsupported():
        pytest.skip(reason)

    result = await scenario.run(stack, params, 0)
    await stack.ensure_up()

    assert result.failures == []


def test_make_test_never_selects_a_restart_of_shared_infrastructure():
    names = {s.name for s in select([], disruptive=False)}

    assert {"rabbitmq-restart", "ferretdb-restart", "dockerd-restart"}.isdisjoint(names)
    assert {"kill-gateway", "registry-down"} <= names


def test_an_unknown_scenario_is_refused_with_the_list():
    with pytest.raises(ValueError, match="kill-gateway"):
        select(["kill-nothing"])


def _orphan_container(prefix: str, machine_id: str) -> None:
    """A created (never started) container labelled as a machine, on a ``prefix`` network."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        net = client.networks.create(f"{prefix}-vlan1", driver="bridge")
        client.containers.create(
            IMAGE,
            labels={"dockvm.machine_id": machine_id, "dockvm.ip": "10.9.9.9"},
            network=net.name,
        )
    finally:
        client.close()


async def test_the_audit_sees_an_orphan_container_a_leaked_and_a_duplicate_ip(mongo_db, tmp_path):
    prefix = f"dvt{uuid.uuid4().hex[:6]}"
    now = datetime.now(UTC)
    await mongo_db["machines"].insert_many(
        [
            {"_id": "m-live1", "state": "running", "ip": "10.9.9.1", "transitions": []},
            {"_id": "m-live2", "state": "running", "ip": "10.9.9.1", "transitions": []},
            {"_id": "m-gone", "state": "destroyed", "ip": None, "transitions": []},
        ]
    )
    lease = {"state": "active", "pool": "p", "allocated_at": now}
    await mongo_db["leases"].insert_many(
        [
            {"_id": "m-live1", "ip": "10.9.9.1", **lease},
            {"_id": "m-gone", "ip": "10.9.9.7", **lease},
        ]
    )
    try:
        await asyncio.to_thread(_orphan_container, prefix, "m-gone")

        failures = "\n".join(await audit(mongo_db.name, prefix))
    finally:
        await asyncio.to_thread(remove_engine_traces, prefix, tmp_path)

    assert "orphan container" in failures and "of m-gone" in failures
    assert "leaked IP 10.9.9.7" in failures
    assert "duplicate IP 10.9.9.1" in failures
    assert "m-live2 has IP 10.9.9.1 but its lease says None" in failures
    assert "m-live1 is running without a container" in failures
