"""The smallest disk the gateway accepts: the largest minimum the dc's hosts report."""

from __future__ import annotations

import pytest

from services.gateway.api.limits import min_disk

MIB, GIB = 1 << 20, 1 << 30


def _host(host_id: str, dc: str, min_disk: int | None = None) -> dict:
    doc = {"_id": host_id, "dc": dc}
    return doc if min_disk is None else {**doc, "min_disk": min_disk}


@pytest.mark.parametrize(
    ("hosts", "dc", "least"),
    [
        ([], "dc1", 300 * MIB),  # no host has reported: XFS's, not "anything goes"
        ([_host("far", "dc2", 8 * GIB)], "dc1", 300 * MIB),  # none of this dc
        ([_host("old", "dc1")], "dc1", 300 * MIB),  # an agent from before the field
        ([_host("a", "dc1", 300 * MIB), _host("b", "dc1", GIB)], "dc1", GIB),
        ([_host("a", "dc1", 300 * MIB), _host("far", "dc2", 8 * GIB)], "dc1", 300 * MIB),
        ([_host("a", "dc1", 300 * MIB), _host("far", "dc2", 8 * GIB)], None, 8 * GIB),
    ],
)
def test_min_disk(hosts, dc, least):
    assert min_disk(hosts, dc) == least
