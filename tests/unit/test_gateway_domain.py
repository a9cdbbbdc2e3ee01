"""Pure gateway logic: placement, host liveness, the lifecycle table, the API models."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.domain import HostView, Ratios, Res, can_act, host_status, largest, place
from services.gateway.domain.models import MachineCreate, MachinePatch
from services.gateway.store import new_machine_id

GIB = 1 << 30


def _host(hid: str, cpus: float = 8, mem: int = 16, used_cpus: float = 0, used_mem: int = 0,
          dc: str = "dc1", status: str = "online", ratio: float = 1.0) -> HostView:
    return HostView(hid, dc, status, Res(cpus, mem * GIB, 100 * GIB),
                    Res(used_cpus, used_mem * GIB, 0), Ratios(ratio, 1.0, 1.0))


NEED = Res(2, 2 * GIB, 10 * GIB)


@pytest.mark.parametrize(
    ("hosts", "counts", "expected"),
    [
        # Packing: the most allocated host that fits wins.
        ([_host("a", used_cpus=1), _host("b", used_cpus=5)], {}, "b"),
        # ...unless it does not fit.
        ([_host("a", used_cpus=1), _host("b", used_cpus=7)], {}, "a"),
        # Anti-affinity beats packing.
        ([_host("a", used_cpus=1), _host("b", used_cpus=5)], {"b": 1}, "a"),
        # Overcommit lets a full host take more CPUs.
        ([_host("a", used_cpus=8, ratio=2.0)], {}, "a"),
        # Memory is not overcommitted by default.
        ([_host("a", used_mem=15)], {}, None),
        # Other dcs and hosts that are not online are never chosen.
        ([_host("a", dc="dc2"), _host("b", status="stale"), _host("c", status="down")], {}, None),
        # Ties break on the host id, so placement is deterministic.
        ([_host("b"), _host("a")], {}, "a"),
        ([], {}, None),
    ],
)
def test_place(hosts, counts, expected):
    assert place(hosts, NEED, "dc1", counts) == expected


@pytest.mark.parametrize(("age", "status"), [(0, "online"), (29.9, "online"), (30, "stale"),
                                             (59, "stale"), (60, "down"), (1e6, "down")])
def test_host_status_from_heartbeat_age(age, status):
    assert host_status(age, 30, 60) == status


def test_largest_takes_each_resource_over_the_dc_hosts_with_overcommit():
    hosts = [_host("a", cpus=4, mem=64, ratio=4.0), _host("b", cpus=32, mem=8),
             _host("c", cpus=128, dc="dc2")]

    assert largest(hosts, "dc1") == Res(32, 64 * GIB, 100 * GIB)
    assert largest(hosts, "dc3") is None


@pytest.mark.parametrize(
    ("action", "state", "allowed"),
    [
        ("stop", "running", True),
        ("start", "stopped", True),
        ("resize", "running", True),
        ("resize", "creating", False),
        ("start", "destroyed", False),
        ("destroy", "creating", True),
        ("destroy", "failed", True),
        ("destroy", "destroyed", False),
        ("restart", "requested", False),
    ],
)
def test_lifecycle_table(action, state, allowed):
    assert can_act(action, state) is allowed


BASE = {"app": "web", "image": "127.0.0.1:5001/dockvm/base:bookworm", "cpus": 1,
        "memory": "512m", "disk": "4g", "dc": "dc1", "vlan_id": 233}


@pytest.mark.parametrize(
    "image",
    ["nginx", "nginx:1.27", "registry.example.com:5000/team/app:v1.2-rc",
     "localhost/a/b/c", "app@sha256:" + "a" * 64],
)
def test_good_image_references(image):
    assert MachineCreate.model_validate({**BASE, "image": image}).image == image


@pytest.mark.parametrize(
    ("override", "fields"),
    [
        ({"image": "UPPER/case"}, {"image"}),
        ({"image": "a b"}, {"image"}),
        ({"image": "app:"}, {"image"}),
        ({"memory": "4x", "disk": "0"}, {"memory", "disk"}),
        ({"cpus": -1}, {"cpus"}),
        ({"hostname_prefix": "a_b"}, {"hostname_prefix"}),
        ({"hostname_prefix": "x" * 41}, {"hostname_prefix"}),
        ({"count": 101}, {"count"}),
        ({"vlan_id": 0}, {"vlan_id"}),
        ({"type": "vm"}, {"type"}),
        ({"ssh_keys": ["not a key"]}, {"ssh_keys.0"}),
        ({"extra": True}, {"extra"}),
    ],
)
def test_bad_create_names_every_failing_field(override, fields):
    with pytest.raises(ValidationError) as info:
        MachineCreate.model_validate({**BASE, **override})

    assert {".".join(str(p) for p in e["loc"]) for e in info.value.errors()} == fields


def test_sizes_are_parsed_in_binary_units():
    spec = MachineCreate.model_validate({**BASE, "memory": "1.5g", "disk": "4G"})

    assert (spec.memory, spec.disk) == (3 * GIB // 2, 4 * GIB)


def test_a_resize_needs_at_least_one_resource():
    with pytest.raises(ValidationError):
        MachinePatch.model_validate({"force": True})


def test_machine_ids_made_in_one_burst_sort_in_the_order_they_were_made():
    ids = [new_machine_id() for _ in range(2000)]  # many share a microsecond

    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
