"""End to end: a create that fails on the host gives its IP straight back to the free list.

The machine never ran, so nothing out there knows its address (no ARP cache, no known_hosts
entry): the 7-day cooldown would only keep it out of use. The stack is test_e2e.py's.
"""

from __future__ import annotations

import asyncio

from tests.integration import test_e2e as e2e

stack = e2e.stack  # ipam, two agents and the gateway, with a pool whose cooldown is an hour


async def _lease_state(stack: e2e.Stack, ip: str, want: str, timeout: float = 60) -> dict:
    """ipam's view of ``ip`` through the gateway, once its state is ``want``."""
    async with asyncio.timeout(timeout):
        while True:
            async with stack.api.get(f"/v1/ips/{ip}") as r:
                assert r.status == 200, await r.text()
                lease = (await r.json())["lease"]
            if lease is not None and lease["state"] == want:
                return lease
            await asyncio.sleep(0.3)


async def test_a_create_that_fails_on_the_host_frees_its_ip_at_once(stack: e2e.Stack):
    spec = stack.spec(app="never", image="127.0.0.1:5001/dockvm/no-such-image:missing")
    async with stack.api.post("/v1/machines?wait=120", json=spec) as r:
        assert r.status == 202, await r.text()
        mid = (await r.json())["machines"][0]["id"]
    [failed] = await e2e._settle(stack.api, [mid])
    async with stack.api.get(f"/v1/machines/{mid}") as r:
        machine = await r.json()
    lease = await _lease_state(stack, machine["ip"], "free")

    assert failed["state"] == "failed"
    assert "image_not_found" in machine["reason"]
    assert "running" not in [t["state"] for t in machine["transitions"]]
    assert lease["cooling_until"] is None
    assert [(h["machine_id"], h["action"]) for h in lease["history"]] == [
        (mid, "allocated"),
        (mid, "released"),
    ]
