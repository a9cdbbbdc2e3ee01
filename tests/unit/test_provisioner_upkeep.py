"""The agent's periodic jobs are bounded: a round stuck in a host command is cut at its bound
(killing the command), and the job's loop runs its next round."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from libs.common.bus import MemoryPublisher
from libs.common.errors import TransientError
from libs.common.runner import ServiceContext
from services.provisioner.adapters import BridgeNetwork
from services.provisioner.adapters.host import run
from services.provisioner.fakes import MemoryRuntime, MemoryVolumes
from services.provisioner.service import AgentConfig, ProvisionerService
from services.provisioner.upkeep import HostUpkeep, UpkeepTimedOut
from tests.unit.test_host_commands import _alive, _wait_for
from tests.unit.test_provisioner_service import _create, _send

G = 1 << 30


class StuckOnceVolumes(MemoryVolumes):
    """The first mount hangs in a real host command, as losetup does on a stuck loop device."""

    def __init__(self, pidfile: Path) -> None:
        super().__init__(total=100 * G)
        self.pidfile = pidfile
        self.mounts = 0

    async def mount(self, machine_id: str) -> bool | None:
        self.mounts += 1
        if self.mounts == 1:
            await run("sh", "-c", f"echo $$ > {self.pidfile}; exec sleep 30", timeout_s=60)
        return await super().mount(machine_id)


@pytest.fixture
def stuck(tmp_path):
    runtime = MemoryRuntime(cpus=4, memory=8 * G)
    volumes = StuckOnceVolumes(tmp_path / "pid")
    publisher = MemoryPublisher()
    agent = ProvisionerService(
        AgentConfig(host_id="h1", dc="dc1", version="1", lxcfs_path=Path("/nonexistent")),
        runtime, BridgeNetwork(runtime, "dockvm"), volumes, publisher,
    )  # fmt: skip
    return agent, runtime, volumes, publisher


def _ctx() -> ServiceContext:
    """A context for its periodic-job loop only (no bus, no database)."""
    wiring = dict.fromkeys(("settings", "connection", "publisher", "rpc", "mongo", "db", "http"))
    return ServiceContext("provisioner", **wiring)  # type: ignore[arg-type]


async def test_a_stuck_reconcile_is_cut_at_its_bound_and_the_loop_runs_again(stuck):
    agent, _, volumes, publisher = stuck
    await _send(agent, publisher, _create("m1"))
    upkeep = HostUpkeep(agent, timeout_s=1.0)
    ctx = _ctx()

    job = ctx.every(0.1, upkeep.reconcile, "reconcile")
    try:
        observed = await _wait_for(lambda: publisher.of_type("container.observed"), 10)
    finally:
        job.cancel()
    stuck_pid = int(volumes.pidfile.read_text())

    assert observed and volumes.mounts >= 2
    assert await _wait_for(lambda: not _alive(stuck_pid)), "the stuck command outlived its round"


async def test_a_cut_round_is_a_transient_error_naming_the_job(stuck):
    agent, _, _, publisher = stuck
    await _send(agent, publisher, _create("m1"))
    upkeep = HostUpkeep(agent, timeout_s=0.3)

    with pytest.raises(UpkeepTimedOut) as caught:
        await upkeep.reconcile()
    again = await upkeep.reconcile()

    assert isinstance(caught.value, TransientError) and caught.value.job == "reconcile"
    assert "within 0.3s" in str(caught.value)
    assert [o.machine_id for o in again] == ["m1"]


async def test_a_stuck_replumb_is_cut_and_logged_not_raised(stuck):
    agent, runtime, _, publisher = stuck
    await _send(agent, publisher, _create("m1"))
    upkeep = HostUpkeep(agent, timeout_s=0.3)
    hang = asyncio.Event()

    async def plumb(info) -> None:
        await hang.wait()

    agent.network.plumb = plumb  # type: ignore[method-assign]

    await upkeep.replumb("m1")  # returns: the stream of starts goes on

    async with agent.lock("m1"):  # and the machine's lock is free again
        assert runtime.containers["m1"].info.running
