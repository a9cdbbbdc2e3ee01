"""Pure IPAM logic: pool validation, reserved ranges, allocatable offsets, blocks, history."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import IPv4Address

import pytest

from services.ipam.domain import (
    PoolRejectedError,
    block_offsets,
    history_of,
    merge_ranges,
    next_block,
    owner_at,
    subtract_ranges,
    validate_pool,
)


def _pool(cidr="10.0.0.0/24", gateway="10.0.0.1", reserved=(), vlan=10, cooldown=0):
    return validate_pool(
        "p", "dc1", vlan, cidr, IPv4Address(gateway), list(reserved), cooldown, "uid"
    )


def _ip(text: str) -> int:
    return int(IPv4Address(text))


@pytest.mark.parametrize(
    ("cidr", "gateway", "reserved", "vlan", "cooldown", "needle"),
    [
        ("10.0.0.0/33", "10.0.0.1", (), 10, 0, "malformed cidr"),
        ("10.0.0.1/24", "10.0.0.1", (), 10, 0, "malformed cidr"),
        ("banana", "10.0.0.1", (), 10, 0, "malformed cidr"),
        ("10.0.0.0", "10.0.0.1", (), 10, 0, "no prefix"),
        ("10.0.0.0/31", "10.0.0.1", (), 10, 0, "smaller than"),
        ("10.0.0.0/24", "10.0.1.1", (), 10, 0, "not a host address"),
        ("10.0.0.0/24", "10.0.0.0", (), 10, 0, "not a host address"),
        ("10.0.0.0/24", "10.0.0.255", (), 10, 0, "not a host address"),
        ("10.0.0.0/24", "10.0.0.1", (), 0, 0, "outside 1-4094"),
        ("10.0.0.0/24", "10.0.0.1", (), 4095, 0, "outside 1-4094"),
        ("10.0.0.0/24", "10.0.0.1", ("10.0.1.5",), 10, 0, "outside"),
        ("10.0.0.0/24", "10.0.0.1", ("10.0.0.9-10.0.0.5",), 10, 0, "ends before"),
        ("10.0.0.0/24", "10.0.0.1", ("nope",), 10, 0, "bad reserved"),
        ("10.0.0.0/24", "10.0.0.1", (), 10, -1, "negative"),
    ],
)
def test_invalid_pool_is_rejected_with_reason(cidr, gateway, reserved, vlan, cooldown, needle):
    with pytest.raises(PoolRejectedError) as exc:
        _pool(cidr, gateway, reserved, vlan, cooldown)
    assert exc.value.reason == "invalid"
    assert needle in str(exc.value)


@pytest.mark.parametrize(
    ("ip", "why"),
    [
        ("10.0.0.0", "ip_reserved"),
        ("10.0.0.255", "ip_reserved"),
        ("10.0.0.1", "ip_reserved"),
        ("10.0.0.20", "ip_reserved"),
        ("10.0.0.72", "ip_reserved"),
        ("10.0.1.1", "ip_outside_pool"),
        ("10.0.0.2", None),
        ("10.0.0.19", None),
        ("10.0.0.80", None),
    ],
)
def test_why_not_allocatable(ip, why):
    pool = _pool(reserved=("10.0.0.20-10.0.0.30", "10.0.0.64/28"))
    assert pool.why_not_allocatable(_ip(ip)) == why


def test_next_allocatable_jumps_over_gateway_and_reserved_ranges():
    pool = _pool(cidr="10.0.0.0/16", gateway="10.0.0.1", reserved=("10.0.0.2-10.0.200.255",))
    assert pool.next_allocatable(0) == _ip("10.0.201.0") - pool.first


def test_next_allocatable_is_none_past_the_last_host():
    pool = _pool(cidr="10.0.0.0/30", gateway="10.0.0.1")
    assert [pool.next_allocatable(0), pool.next_allocatable(3)] == [2, None]


def test_usage_counts_exclude_network_broadcast_and_count_gateway_as_reserved():
    pool = _pool(reserved=("10.0.0.10-10.0.0.19", "10.0.0.0/30"))
    assert (pool.usable_count(), pool.reserved_count()) == (254, 10 + 3)


def test_blocks_cover_only_allocatable_offsets():
    pool = _pool(cidr="10.0.0.0/26", gateway="10.0.0.1", reserved=("10.0.0.5",))
    blocks = [block_offsets(pool, k, 16) for k in range(4)]
    assert blocks[0] == [2, 3, 4, *range(6, 16)]
    assert blocks[3] == list(range(48, 63))
    assert sum(len(b) for b in blocks) == 64 - 2 - 2


def test_next_block_skips_fully_reserved_blocks():
    pool = _pool(cidr="10.0.0.0/24", reserved=("10.0.0.32-10.0.0.127",))
    assert [next_block(pool, 1, 32), next_block(pool, 4, 32), next_block(pool, 8, 32)] == [
        4,
        4,
        None,
    ]


@pytest.mark.parametrize(
    ("a", "b", "out"),
    [
        ([(1, 10)], [(3, 4)], ((1, 2), (5, 10))),
        ([(1, 10)], [(0, 20)], ()),
        ([(1, 10), (20, 30)], [(5, 25)], ((1, 4), (26, 30))),
        ([(1, 10)], [], ((1, 10),)),
    ],
)
def test_subtract_ranges(a, b, out):
    assert subtract_ranges(a, b) == out


def test_merge_ranges_joins_touching_ranges():
    assert merge_ranges([(5, 6), (1, 3), (4, 4), (10, 12)]) == ((1, 6), (10, 12))


def _t(hour: int) -> datetime:
    return datetime(2026, 11, 24, hour, tzinfo=UTC)


LEASES = [
    {"machine_id": "a", "allocated_at": _t(1), "released_at": _t(5), "pool": "p", "gen": 1},
    {"machine_id": "b", "allocated_at": _t(5), "released_at": None, "pool": "p", "gen": 2},
]


def test_history_lists_allocations_and_releases_in_order():
    steps = [(e.machine_id, e.action, e.at) for e in history_of(reversed(LEASES))]
    assert steps == [("a", "allocated", _t(1)), ("a", "released", _t(5)), ("b", "allocated", _t(5))]


@pytest.mark.parametrize(("hour", "owner"), [(0, None), (1, "a"), (4, "a"), (5, "b"), (9, "b")])
def test_owner_at_answers_who_had_the_ip_then(hour, owner):
    assert owner_at(LEASES, _t(hour)) == owner
