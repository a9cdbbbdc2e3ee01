"""The host agent's pure decisions: create guards, the container spec, resize guards, sums,
orphans."""

from __future__ import annotations

import pytest

from libs.common.contracts.provisioner import ContainerCreate, ContainerResize
from libs.common.errors import ValidationFailed
from services.provisioner.domain import (
    CAPABILITIES,
    HostFacts,
    Limits,
    OrphanTracker,
    ResizeRefused,
    allocation,
    build_spec,
    check_create,
    container_name,
    cpus_from_quota,
    cpus_to_quota,
    free_disk,
    mac_address,
    machine_environment,
    plan_resize,
    port_name,
)

HOST = HostFacts(cpus=8, memory=16 << 30, disk_free=100 << 30)
G = 1 << 30
M = 1 << 20


def _create(**overrides: object) -> ContainerCreate:
    fields: dict[str, object] = {
        "machine_id": "m-1",
        "app": "web",
        "image": "dockvm/base:bookworm",
        "cpus": 2,
        "memory": "1g",
        "disk": "10g",
        "ip": "10.1.2.10",
        "prefix_len": 24,
        "gateway": "10.1.2.1",
        "vlan_id": 12,
        "hostname": "web-1",
        "ssh_authorized_keys": ["ssh-ed25519 AAAA a@b", "ssh-ed25519 BBBB c@d "],
        "env": {"APP_ENV": "prod"},
        "labels": {"team": "ops"},
    }
    fields.update(overrides)
    return ContainerCreate.model_validate(fields)


def test_a_fitting_create_passes():
    check_create(_create(), HOST)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"machine_id": "has space"}, "invalid_machine_id"),
        ({"cpus": 9}, "cpus_exhausted"),
        ({"memory": "8m"}, "memory_too_small"),
        ({"memory": "17g"}, "memory_exhausted"),
        ({"disk": "100m"}, "disk_too_small"),
        ({"disk": "101g"}, "disk_exhausted"),
        ({"ip": "10.1.2.0"}, "bad_ip"),
        ({"ip": "10.1.2.255"}, "bad_ip"),
        ({"ip": "10.1.2.1"}, "bad_ip"),
        ({"gateway": "10.1.3.1"}, "bad_gateway"),
        ({"labels": {"dockvm.app": "x"}}, "bad_labels"),
    ],
)
def test_a_create_the_host_cannot_serve_is_refused_with_a_reason(overrides, reason):
    with pytest.raises(ValidationFailed) as err:
        check_create(_create(**overrides), HOST)
    assert err.value.reason == reason


def test_spec_is_hardened_labelled_and_carries_keys_limits_and_lxcfs():
    spec = build_spec(
        _create(direct_ssh=True),
        data_path="/state/volumes/mnt/m-1",
        network="dockvm-vlan12",
        static_ip=True,
        lxcfs_root="/var/lib/lxcfs",
        lxcfs_present=["proc/meminfo", "proc/uptime"],
        environment_file="/state/machines/m-1/environment",
    )

    assert spec.name == "dockvm-m-1" == container_name("m-1")
    assert spec.labels == {
        "team": "ops",
        "dockvm.machine_id": "m-1",
        "dockvm.app": "web",
        "dockvm.ip": "10.1.2.10",
        "dockvm.vlan": "12",
        "dockvm.prefix_len": "24",
        "dockvm.gateway": "10.1.2.1",
        "dockvm.direct_ssh": "true",
    }
    assert spec.env == {
        "OMP_NUM_THREADS": "2",
        "APP_ENV": "prod",
        "DOCKVM_AUTHORIZED_KEYS": "ssh-ed25519 AAAA a@b\nssh-ed25519 BBBB c@d",
    }
    assert [(m.source, m.target, m.read_only) for m in spec.mounts] == [
        ("/state/volumes/mnt/m-1", "/data", False),
        ("/state/machines/m-1/environment", "/etc/environment", True),
        ("/var/lib/lxcfs/proc/meminfo", "/proc/meminfo", True),
        ("/var/lib/lxcfs/proc/uptime", "/proc/uptime", True),
    ]
    assert (spec.cpus, spec.memory, spec.ip) == (2, G, "10.1.2.10")
    assert spec.restart_policy == "unless-stopped"
    assert "SYS_ADMIN" not in spec.capabilities and "NET_ADMIN" not in spec.capabilities
    assert set(spec.capabilities) == set(CAPABILITIES)
    assert not [m for m in spec.mounts if "docker.sock" in m.source]


def test_spec_without_lxcfs_binds_only_the_data_disk_and_ovs_gets_no_docker_ip():
    spec = build_spec(
        _create(ssh_authorized_keys=[]), data_path="/d", network="none", static_ip=False,
        lxcfs_root=None,
    )  # fmt: skip

    assert [m.target for m in spec.mounts] == ["/data"]
    assert spec.ip is None
    assert "DOCKVM_AUTHORIZED_KEYS" not in spec.env


@pytest.mark.parametrize(("cpus", "quota"), [(1, 100_000), (0.5, 50_000), (2.25, 225_000)])
def test_cpu_quota_round_trips(cpus, quota):
    assert cpus_to_quota(cpus) == quota
    assert cpus_from_quota(quota, 100_000) == cpus


def test_names_and_macs_are_stable_short_and_distinct():
    assert port_name("m-1") == port_name("m-1") != port_name("m-2")
    assert len(port_name("x" * 64) + "c") <= 15
    assert mac_address("m-1") == mac_address("m-1") != mac_address("m-2")
    assert mac_address("m-1").startswith("02:")


def _resize(**kw: object) -> ContainerResize:
    return ContainerResize.model_validate({"machine_id": "m-1", **kw})


CURRENT = Limits(cpus=2, memory=2 * G, disk=10 * G)


def test_growing_everything_is_planned():
    plan = plan_resize(
        _resize(cpus=4, memory="4g", disk="20g"), CURRENT, memory_used=G, margin=64 * M, host=HOST
    )
    assert (plan.cpus, plan.memory, plan.disk) == (4, 4 * G, 20 * G)


def test_unchanged_values_are_left_alone():
    plan = plan_resize(
        _resize(cpus=2, memory="2g", disk="10g"), CURRENT, memory_used=G, margin=0, host=HOST
    )
    assert plan.empty


@pytest.mark.parametrize(
    ("kw", "used", "reason"),
    [
        ({"disk": "5g"}, 0, "disk_shrink_refused"),
        ({"disk": "200g"}, 0, "disk_exhausted"),
        ({"memory": "1g"}, 1000 * M, "memory_below_usage"),
        ({"memory": "32g"}, 0, "memory_exhausted"),
        ({"memory": "10m"}, 0, "memory_too_small"),
        ({"cpus": 16}, 0, "cpus_exhausted"),
    ],
)
def test_harmful_resizes_are_refused(kw, used, reason):
    with pytest.raises(ResizeRefused) as err:
        plan_resize(_resize(**kw), CURRENT, memory_used=used, margin=64 * M, host=HOST)
    assert err.value.reason == reason


@pytest.mark.parametrize(("used", "force"), [(900 * M, False), (1000 * M, True)])
def test_memory_may_shrink_above_usage_plus_margin_or_when_forced(used, force):
    plan = plan_resize(
        _resize(memory="1g", force=force), CURRENT, memory_used=used, margin=64 * M, host=HOST
    )
    assert plan.memory == G


def test_allocation_sums_the_machines():
    total = allocation([Limits(1.5, G, 10 * G), Limits(0.25, 512 * M, 5 * G)])
    assert total == Limits(1.75, G + 512 * M, 15 * G)


def test_free_disk_reserves_what_sparse_images_may_still_claim():
    assert free_disk(100 * G, [(10 * G, 1 * G), (5 * G, 5 * G)]) == 91 * G


def test_no_orphan_until_the_control_plane_sends_a_list():
    t = OrphanTracker(grace_s=0)
    assert t.sweep(["a", "b"], now=100) == []
    assert not t.is_orphan("a")


def test_an_orphan_is_due_only_after_grace_and_a_fresh_list_still_lacks_it():
    t = OrphanTracker(grace_s=10)
    t.update_known(["a"], now=0)

    first = t.sweep(["a", "b"], now=1)  # b is first seen unknown at 1
    late_but_stale = t.sweep(["a", "b"], now=20)  # no list since: not due
    t.update_known(["a"], now=21)
    due = t.sweep(["a", "b"], now=22)

    assert (first, late_but_stale, due) == ([], [], ["b"])
    assert t.is_orphan("b") and not t.is_orphan("a")


def test_a_machine_known_again_is_no_longer_an_orphan():
    t = OrphanTracker(grace_s=10)
    t.update_known(["a"], now=0)
    t.sweep(["a", "b"], now=1)
    t.update_known(["a", "b"], now=5)
    t.update_known(["a"], now=30)

    assert t.sweep(["a", "b"], now=31) == []  # the clock restarted at 31
    assert t.sweep(["a", "b"], now=40) == []


@pytest.mark.parametrize(("cpus", "n"), [(0.25, 1), (1, 1), (1.5, 2), (4, 4)])
def test_nproc_inside_follows_the_cpu_limit_rounded_up(cpus, n):
    assert machine_environment(cpus) == f"OMP_NUM_THREADS={n}\n"
