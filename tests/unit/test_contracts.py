"""The envelope and message models: versioning, strictness, and round trips."""

from __future__ import annotations

import json

import pytest

from libs.common.contracts import Envelope, message_model
from libs.common.contracts.ipam import IpAllocate, IpAllocated
from libs.common.contracts.provisioner import ContainerCreate
from libs.common.contracts.releases import Artifact, ReleaseRequested
from libs.common.errors import ValidationFailed


def _create(**over: object) -> dict:
    base = {
        "machine_id": "m-1",
        "app": "web",
        "image": "127.0.0.1:5001/dockvm/base:bookworm",
        "cpus": 1.5,
        "memory": "512m",
        "disk": "4g",
        "ip": "10.100.0.23",
        "prefix_len": 24,
        "gateway": "10.100.0.1",
        "vlan_id": 100,
        "hostname": "web-1",
    }
    return {**base, **over}


def test_envelope_round_trip_keeps_every_field():
    msg = IpAllocate(machine_id="m-1", pool="p1")
    env = Envelope.wrap(msg, source="gateway", correlation_id="c-1", causation_id="x-0")

    back = Envelope.from_bytes(env.to_bytes())

    assert back == env
    assert back.parse() == msg
    assert (back.type, back.version, back.source) == ("ip.allocate", 1, "gateway")


def test_envelope_mints_correlation_id_from_its_own_id():
    env = Envelope.wrap(IpAllocate(machine_id="m", pool="p"), source="t")

    assert env.correlation_id == env.id


def test_commands_forbid_unknown_fields():
    env = Envelope(type="ip.allocate", source="t", data={"machine_id": "m", "pool": "p", "x": 1})

    with pytest.raises(ValidationFailed, match="x: Extra inputs are not permitted"):
        env.parse()


def test_envelope_ignores_top_level_fields_it_does_not_know():
    env = Envelope.wrap(IpAllocate(machine_id="m-1", pool="p1"), source="gateway")
    newer = {**json.loads(env.to_bytes()), "trace_id": "t-1", "deadline": "2030-01-01T00:00:00Z"}

    back = Envelope.from_bytes(json.dumps(newer).encode())

    assert back == env
    assert back.parse() == IpAllocate(machine_id="m-1", pool="p1")


def test_command_data_stays_strict_inside_a_lenient_envelope():
    data = {"machine_id": "m", "pool": "p", "added_later": 1}
    body = {"type": "ip.allocate", "source": "t", "trace_id": "t-1", "data": data}
    env = Envelope.from_bytes(json.dumps(body).encode())

    with pytest.raises(ValidationFailed, match="added_later: Extra inputs are not permitted"):
        env.parse()


def test_events_ignore_unknown_fields_so_additions_are_compatible():
    data = {
        "machine_id": "m",
        "ip": "10.0.0.5",
        "prefix_len": 24,
        "gateway": "10.0.0.1",
        "vlan_id": 5,
        "pool": "p",
        "dc": "dc1",
        "added_in_a_later_release": True,
    }
    env = Envelope(type="ip.allocated", source="ipam", data=data)

    assert isinstance(env.parse(), IpAllocated)


def test_unknown_version_is_rejected():
    env = Envelope(type="ip.allocate", version=9, source="t", data={})

    with pytest.raises(ValidationFailed, match="no message model for ip.allocate v9"):
        env.parse()


def test_models_are_frozen():
    msg = IpAllocate(machine_id="m", pool="p")

    with pytest.raises(ValueError, match="frozen"):
        msg.machine_id = "other"  # type: ignore[misc]


def test_registry_finds_models_by_type():
    assert message_model("container.create") is ContainerCreate


def test_sizes_accept_units():
    msg = ContainerCreate.model_validate(_create())

    assert (msg.memory, msg.disk) == (512 << 20, 4 << 30)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory", "12 parsecs"),
        ("memory", -1),
        ("cpus", 0),
        ("vlan_id", 4095),
        ("hostname", "Web_1"),
        ("ip", "10.0.0.300"),
    ],
)
def test_create_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        ContainerCreate.model_validate(_create(**{field: value}))


def test_allocate_needs_pool_or_dc_and_vlan():
    with pytest.raises(ValueError, match="give either pool, or both dc and vlan_id"):
        IpAllocate(machine_id="m", dc="dc1")


def test_malformed_envelope_names_the_field():
    with pytest.raises(ValidationFailed, match="source: Field required"):
        Envelope.from_bytes(b'{"type": "ip.allocate", "data": {}}')


def _artifact(**over: object) -> dict:
    return {"group_id": "com.example", "artifact_id": "demo-app", "version": "1.0.0", **over}


HOSTILE_IDS = ["1.0;rm -rf /", "../../etc", ".hidden", "1..0", "1.0.", "a/b", "$(id)", "a b"]


@pytest.mark.parametrize("value", HOSTILE_IDS)
@pytest.mark.parametrize("field", ["group_id", "artifact_id", "version", "classifier"])
def test_artifact_refuses_values_that_are_not_one_safe_path_segment(field, value):
    with pytest.raises(ValueError, match=field):
        Artifact.model_validate(_artifact(**{field: value}))


@pytest.mark.parametrize("value", HOSTILE_IDS)
def test_release_ids_that_are_not_one_safe_path_segment_are_refused(value):
    deploy = {
        "release_id": value,
        "machine_id": "m-1",
        "artifact": _artifact(),
        "health_check": {"type": "http", "target": "8000/"},
    }
    env = Envelope(type="deploy", source="gateway", data=deploy)

    with pytest.raises(ValidationFailed, match="release_id: String should match pattern"):
        env.parse()


@pytest.mark.parametrize("version", ["1.0.0", "2.1.0-SNAPSHOT", "1_0", "-n", "20260101.1"])
def test_ordinary_versions_are_accepted(version):
    assert Artifact.model_validate(_artifact(version=version)).version == version


@pytest.mark.parametrize("release_id", ["rel-0123abcd", "r:1.2", "2026.11.29-1"])
def test_ordinary_release_ids_are_accepted(release_id):
    assert (
        ReleaseRequested.model_validate(
            {
                **_artifact(),
                "release_id": release_id,
                "app": "web",
                "batch_size": 1,
                "health_check": {"type": "tcp", "target": "8000"},
            }
        ).release_id
        == release_id
    )
