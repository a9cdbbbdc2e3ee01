"""The state of a machine whose host stopped answering is ``unreachable``; documents stored when
it was called ``unknown`` are still read, and come back with their host."""

from __future__ import annotations

from libs.common.contracts import provisioner
from services.gateway.domain import State, can_act
from services.gateway.domain.states import allowed_from
from tests.unit.test_gateway_sagas import GIB, _allocated, _create, _keys, clock, driver, pub, store

__all__ = ["clock", "driver", "pub", "store"]  # fixtures, imported for pytest


def test_the_old_name_reads_as_unreachable():
    assert State("unknown") is State.UNREACHABLE
    assert can_act("start", "unknown") and can_act("destroy", "unknown")
    assert {"unknown", "unreachable"} <= set(allowed_from("destroy"))


async def test_a_machine_stored_unknown_comes_back_running_with_its_host(driver, store, pub, clock):
    [mid] = await _create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    [host] = [k.split(".")[1] for k in _keys(pub, "container.create")]
    await driver.creates.on_created(mid, host, "c1")
    # As a gateway before the rename left it.
    await store.update(mid, {}, {"state": "unknown", "state_before_unknown": "running"})
    active = await store.load("dc1")

    await driver.hosts.on_heartbeat(provisioner.HostHeartbeat(
        host_id=host, dc="dc1", version="t", at=clock(),
        capacity=provisioner.Resources(cpus=2, memory=8 * GIB, disk=100 * GIB),
        allocated=provisioner.Resources(cpus=1, memory=GIB, disk=GIB)))  # fmt: skip
    back = await store.get(mid)

    assert active.allocated[host].cpus == 1.0  # still counted on its host
    assert (back["state"], back["reason"]) == ("running", "host_back")
