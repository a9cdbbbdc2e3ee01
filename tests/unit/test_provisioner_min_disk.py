"""A host reports the smallest disk its volume driver can make, and refuses less itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.common.bus import MemoryPublisher
from libs.common.contracts.provisioner import XFS_MIN_DISK_BYTES
from libs.common.errors import ValidationFailed
from services.provisioner.adapters import BridgeNetwork
from services.provisioner.adapters.volumes import LvmVolumes, XfsLoopVolumes
from services.provisioner.capacity import DiskLedger
from services.provisioner.domain import HostFacts, check_create
from services.provisioner.fakes import MemoryRuntime, MemoryVolumes
from services.provisioner.service import AgentConfig, ProvisionerService
from services.provisioner.upkeep import HostUpkeep
from tests.unit.test_provisioner_service import _create

G = 1 << 30


def _agent(volumes: MemoryVolumes) -> tuple[ProvisionerService, MemoryPublisher]:
    runtime = MemoryRuntime(cpus=4, memory=8 * G)
    publisher = MemoryPublisher()
    agent = ProvisionerService(
        AgentConfig(host_id="h1", dc="dc1", version="1", lxcfs_path=Path("/nonexistent")),
        runtime, BridgeNetwork(runtime, "dockvm"), volumes, publisher,
    )  # fmt: skip
    return agent, publisher


def test_both_drivers_make_nothing_smaller_than_xfs_can(tmp_path):
    assert XFS_MIN_DISK_BYTES == 300 << 20
    assert XfsLoopVolumes(tmp_path).min_size == XFS_MIN_DISK_BYTES
    assert LvmVolumes(tmp_path, "vg0").min_size == XFS_MIN_DISK_BYTES


@pytest.mark.parametrize("min_size", [XFS_MIN_DISK_BYTES, 2 * G])
async def test_the_heartbeat_carries_the_drivers_minimum(min_size):
    agent, publisher = _agent(MemoryVolumes(total=100 * G, min_size=min_size))
    beat = await HostUpkeep(agent).heartbeat()

    assert beat.min_disk_bytes == min_size
    assert [b.min_disk_bytes for b in publisher.of_type("host.heartbeat")] == [min_size]


@pytest.mark.parametrize(("disk", "refused"), [((300 << 20) - 1, True), (300 << 20, False)])
def test_a_disk_below_the_drivers_minimum_is_refused_on_the_host_too(disk, refused):
    cmd = _create("m1", disk=disk)
    host = HostFacts(cpus=4, memory=8 * G, disk_free=100 * G, min_disk=300 << 20)
    if refused:
        with pytest.raises(ValidationFailed) as err:
            check_create(cmd, host)
        assert err.value.reason == "disk_too_small"
    else:
        check_create(cmd, host)


def test_an_unmeasured_disk_admits_nothing():
    assert DiskLedger().available == 0
    assert DiskLedger(measured=5 * G, reserved={"m1": G}).available == 4 * G
