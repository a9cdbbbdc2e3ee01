"""A disk below what the hosts' volume driver can make is a 422 at once, leaving nothing.

The gateway and its simulated peers are test_gateway.py's; the peers' hosts h1 and h2 send no
minimum (an older agent), so XFS's 300 MiB applies to them.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import aiohttp
import pytest

from libs.common.contracts import provisioner
from tests.integration import test_gateway as tg

GIB = 1 << 30
peers, gateway, api = tg.peers, tg.gateway, tg.api  # the gateway with h1, h2 beating in dc1


def _beat(peers: tg.Peers, host_id: str, dc: str, min_disk: int) -> None:
    """Heartbeats of a host whose volume driver makes nothing under ``min_disk``."""

    async def loop() -> None:
        while True:
            await peers.publisher.publish(
                provisioner.HostHeartbeat(
                    host_id=host_id, dc=dc, version="test", at=datetime.now(UTC),
                    capacity=provisioner.Resources(cpus=8, memory=16 * GIB, disk=100 * GIB),
                    allocated=provisioner.Resources(cpus=0, memory=0, disk=0),
                    min_disk_bytes=min_disk,
                )
            )  # fmt: skip
            await asyncio.sleep(0.5)

    peers.beating[host_id] = asyncio.create_task(loop())


async def _refused(api: aiohttp.ClientSession, method: str, url: str, body: dict) -> dict:
    """The problem of a request answered 422."""
    async with api.request(method, url, json=body) as r:
        assert (r.status, r.content_type) == (422, "application/problem+json"), await r.text()
        return await r.json()


@pytest.mark.parametrize(("disk", "accepted"), [("299m", False), ("300m", True)])
async def test_a_disk_below_300m_is_refused_at_once_and_leaves_nothing(
    api, peers, mongo_db, disk, accepted
):
    _beat(peers, "far", "dc2", 10 * GIB)  # another dc's minimum does not apply to dc1
    await tg._hosts_known(api, {"far"})
    async with api.post("/v1/machines?wait=20", json={**tg.SPEC, "disk": disk}) as r:
        status, body = r.status, await r.json()
    async with api.get("/v1/machines") as r:
        listed = (await r.json())["items"]
    claims = peers.sent("ip.allocate") + peers.sent("ip.allocate_many")
    stored = await mongo_db["machines"].count_documents({})  # the gateway's own database

    if accepted:
        assert status == 202
        assert [m["state"] for m in listed] == ["running"]
        assert listed[0]["disk"] == 300 << 20
        # One machine; its IP step may be re-sent (at least once), never for another.
        assert ({c.machine_id for c in claims}, stored) == ({listed[0]["id"]}, 1)
    else:
        assert status == 422
        assert [(e["field"], e["type"]) for e in body["errors"]] == [("disk", "too_small")]
        assert "300" in body["errors"][0]["message"]
        assert (listed, claims, stored) == ([], [], 0)


async def test_a_host_reporting_a_larger_minimum_raises_it_for_its_dc(api, peers):
    mid = (await tg._create(api, disk="512m"))["machines"][0]["id"]
    _beat(peers, "lvm1", "dc1", GIB)
    await tg._hosts_known(api, {"lvm1"})
    create = await _refused(api, "POST", "/v1/machines", {**tg.SPEC, "disk": "512m"})
    scale = await _refused(api, "POST", "/v1/apps/web/scale", {"count": 2})
    resize = await _refused(api, "PATCH", f"/v1/machines/{mid}", {"disk": "768m"})
    async with api.patch(f"/v1/machines/{mid}", json={"disk": "1g"}) as r:
        grown = r.status, (await r.json())["disk"]
    async with api.get("/v1/machines") as r:
        listed = (await r.json())["items"]
    async with api.get("/v1/hosts") as r:
        minimums = {h["id"]: h["min_disk"] for h in (await r.json())["items"]}

    assert minimums == {"h1": 300 << 20, "h2": 300 << 20, "lvm1": GIB}
    assert [e["field"] for p in (create, scale, resize) for e in p["errors"]] == ["disk"] * 3
    assert "the app's disk" in scale["errors"][0]["message"]
    assert grown == (200, GIB)
    assert [m["id"] for m in listed] == [mid]
    assert {c.machine_id for c in peers.sent("ip.allocate")} == {mid}  # the refused claimed none
    assert peers.sent("ip.allocate_many") == []
