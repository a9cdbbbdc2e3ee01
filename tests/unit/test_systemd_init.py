"""systemd as a machine's init, without an engine: what the container spec asks of Docker for
each init, how the init is chosen, the gateway's refusal of a bad one, and a reboot inside
read as a reboot (not a stop) by the gateway."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from libs.common.contracts.monitor import ContainerDied
from services.gateway.domain.models import MachineCreate
from services.gateway.handlers import MACHINE_EVENTS
from services.provisioner.domain import (
    CAPABILITIES,
    build_spec,
    machine_init,
    systemd_cgroup,
)
from tests.unit.test_gateway_sagas import (  # noqa: F401 (fixtures)
    _allocated,
    clock,
    driver,
    pub,
    store,
)
from tests.unit.test_gateway_sagas import _create as _gateway_create
from tests.unit.test_provisioner_domain import _create


def _spec(init: str | None, cgroup: str | None = "/sys/fs/cgroup/systemd/dockvm/dockvm-m-1"):
    return build_spec(
        _create(), data_path="/d", network="n", static_ip=True, lxcfs_root=None,
        init=init, systemd_cgroup=cgroup,
    )  # fmt: skip


def test_a_systemd_spec_is_unprivileged_with_only_what_systemd_needs():
    spec = _spec("systemd")
    cgroup = [m for m in spec.mounts if m.target == "/sys/fs/cgroup/systemd"]

    assert spec.capabilities == (*CAPABILITIES, "SETPCAP")
    assert "SYS_ADMIN" not in spec.capabilities and "SYS_BOOT" not in spec.capabilities
    assert (spec.tmpfs, spec.cgroupns, spec.stop_signal) == (
        ("/run", "/run/lock"), "private", "SIGINT")
    assert [(m.source, m.read_only) for m in cgroup] == [(systemd_cgroup("m-1"), False)]
    # A reboot (exit 129) and an engine going down (143) come back, a poweroff (0) not.
    assert spec.restart_policy == "on-failure"
    assert (spec.env["container"], spec.labels["dockvm.init"]) == ("docker", "systemd")


def test_a_tini_spec_is_as_before():
    spec = _spec("tini")

    assert spec.capabilities == CAPABILITIES
    assert (spec.tmpfs, spec.cgroupns, spec.stop_signal) == ((), None, None)
    assert spec.restart_policy == "unless-stopped"
    assert "dockvm.init" not in spec.labels and "container" not in spec.env


def test_a_cgroup_v2_host_binds_no_cgroup():
    assert [m.target for m in _spec("systemd", cgroup=None).mounts] == ["/data"]


@pytest.mark.parametrize(
    ("requested", "labels", "init"),
    [
        (None, {}, "tini"),
        (None, {"dockvm.init": "systemd"}, "systemd"),
        ("tini", {"dockvm.init": "systemd"}, "tini"),
        ("systemd", {}, "systemd"),
        (None, {"dockvm.init": "runit"}, "tini"),
    ],
)
def test_the_create_chooses_the_init_else_the_image_label(requested, labels, init):
    assert machine_init(requested, labels) == init


def test_the_gateway_refuses_an_unknown_init():
    base = {"app": "a", "image": "dockvm/base:bookworm", "cpus": 1, "memory": "256m",
            "disk": "1g", "dc": "dc1", "vlan_id": 3}  # fmt: skip
    with pytest.raises(ValidationError) as err:
        MachineCreate.model_validate({**base, "init": "upstart"})

    assert [e["loc"] for e in err.value.errors()] == [("init",)]
    assert MachineCreate.model_validate(base).init is None


def _died(mid: str, code: int) -> ContainerDied:
    return ContainerDied(machine_id=mid, container_id="c", host="h1", at=datetime.now(UTC),
                         exit_code=code)  # fmt: skip


@pytest.mark.parametrize(
    ("code", "state", "reason"),
    [(129, "running", "rebooted (exit 129)"), (0, "stopped", "died (exit 0)")],
)
async def test_a_reboot_inside_is_recorded_as_such_a_poweroff_as_a_stop(
    driver, store, code, state, reason  # noqa: F811 (the imported fixtures)
):
    [mid] = await _gateway_create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_created(mid, "h1", "c1")
    await MACHINE_EVENTS[ContainerDied](driver, _died(mid, code), None)
    doc = await store.get(mid)

    assert (doc["state"], doc["reason"]) == (state, reason)
