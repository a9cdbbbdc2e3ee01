"""Releases end to end: the gateway rolls a Maven artifact onto an app's running machines.

Real ipam, two provisioner agents, the gateway, Docker, and the local Maven repository
(`scripts/maven-repo.sh`: demo-app 1.0.0 and 2.0.0 serve their version on :8000, 3.0.0 is
broken).
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.integration.test_e2e import Stack, _machines, stack  # noqa: F401 - fixture

HEALTH = {"type": "http", "target": "8000/", "timeout_s": 6}


def release(version: str, **over: object) -> dict:
    return {"app": "shop", "group_id": "com.example", "artifact_id": "demo-app",
            "version": version, "batch_size": 2, "health_check": HEALTH, **over}


async def _finished(api: aiohttp.ClientSession, rid: str, timeout: float = 180) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            async with api.get(f"/v1/releases/{rid}") as r:
                doc = await r.json()
            if doc["status"] != "running":
                return doc
            await asyncio.sleep(0.5)


async def _serving(ips: list[str]) -> list[str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        out = []
        for ip in ips:
            async with s.get(f"http://{ip}:8000/") as r:
                out.append((await r.text()).strip())
        return out


async def _start(api: aiohttp.ClientSession, body: dict) -> dict:
    async with api.post("/v1/releases", json=body) as r:
        assert r.status == 202, await r.text()
        return await r.json()


async def test_rolling_release_upgrade_and_failed_release(stack: Stack):  # noqa: F811
    api = stack.api
    async with api.post("/v1/machines?wait=240", json=stack.spec(app="shop", count=4)) as r:
        assert r.status == 202, await r.text()
    machines = sorted(await _machines(api, app="shop", state="running"), key=lambda m: m["id"])
    ips = [m["ip"] for m in machines]
    assert len(ips) == 4

    # 1. v1 onto 4 machines in batches of 2.
    v1 = await _finished(api, (await _start(api, release("1.0.0")))["id"])
    served_v1 = await _serving(ips)
    # 2. v2 everywhere.
    v2 = await _finished(api, (await _start(api, release("2.0.0")))["id"])
    served_v2 = await _serving(ips)
    # 3. the broken v3 stops after its first batch, which goes back to v2.
    v3 = await _finished(api, (await _start(api, release("3.0.0")))["id"])
    served_v3 = await _serving(ips)

    assert (v1["status"], len(v1["batches"])) == ("succeeded", 2)
    assert served_v1 == ["demo-app 1.0.0"] * 4
    assert v2["status"] == "succeeded"
    assert served_v2 == ["demo-app 2.0.0"] * 4
    first, second = v3["batches"]
    assert v3["status"] == "failed"
    assert {v3["machines"][m]["status"] for m in first} == {"failed"}
    assert {v3["machines"][m]["rolled_back"] for m in first} == {True}
    assert {v3["machines"][m]["status"] for m in second} == {"pending"}
    assert served_v3 == ["demo-app 2.0.0"] * 4


BAD_RELEASES = {
    "unknown-app": (release("1.0.0", app="nobody"), 404, "not_found"),
    "missing-artifact": (release("9.9.9"), 404, "not_found"),
    "bad-coordinates": (release("1.0.0", group_id="com example"), 422, "invalid"),
    "no-batch-rule": (release("1.0.0", batch_size=None), 422, "invalid"),
    "bad-check": (release("1.0.0", health_check={"type": "ping", "target": "x"}), 422, "invalid"),
}


async def test_bad_releases_are_refused_and_change_nothing(stack: Stack):  # noqa: F811
    # One stack and one running machine of the app for all the cases: a refused release
    # changes nothing, so each case sees the same world (and the suite pays one setup).
    api = stack.api
    async with api.post("/v1/machines?wait=240", json=stack.spec(app="shop")) as r:
        assert r.status == 202, await r.text()

    answers = {}
    for case, (body, _, _) in BAD_RELEASES.items():
        async with api.post("/v1/releases", json=body) as r:
            answers[case] = (r.status, (await r.json())["reason"])
    async with api.get("/v1/releases") as r:
        listed = (await r.json())["items"]

    assert answers == {case: (status, reason) for case, (_, status, reason) in BAD_RELEASES.items()}
    assert listed == []
