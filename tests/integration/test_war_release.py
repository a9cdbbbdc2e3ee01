"""A war release on the Java flavour, end to end: the gateway rolls examples/war-app (built by
Maven, in the local Maven repository as 1.0.0, 2.0.0 and a broken 3.0.0 whose context fails to
start) onto two machines of dockvm/java-tomcat:bookworm (systemd, Java 17, Tomcat 10), one at a
time; each war becomes Tomcat's ROOT application and is checked over HTTP on 8080. 1.0.0 and
the broken 3.0.0 restart Tomcat; 2.0.0 is reloaded (Tomcat redeploys it, same JVM).

Real ipam, two provisioner agents, the gateway, Docker and the Maven repository
(``scripts/maven-repo.sh up``).
"""

from __future__ import annotations

import os

import aiohttp
import docker

from tests.integration.test_e2e import Stack, _machines, stack  # noqa: F401 - fixture
from tests.integration.test_releases_e2e import _finished, _start

IMAGE = os.environ.get("DOCKVM_JAVA_IMAGE", "dockvm/java-tomcat:bookworm")
# Tomcat's JVM starts in seconds on a quiet host; a loaded one takes longer.
HEALTH = {"type": "http", "target": "8080/", "timeout_s": 120}
# Tomcat opens 8080 only once its applications are deployed: a 404 then means the war failed.
HEALTH_FAIL_FAST = {**HEALTH, "fail_after": 3}


def release(version: str, activate: str = "restart") -> dict:
    return {"app": "tomcat", "group_id": "com.example", "artifact_id": "war-app",
            "version": version, "packaging": "war", "batch_size": 1,
            "health_check": HEALTH_FAIL_FAST, "activate": activate}


def _tomcat_pids(mids: list[str]) -> list[str]:
    """Tomcat's JVM on each machine (systemd's MainPID of tomcat10)."""
    client = docker.from_env()
    try:
        return [
            client.containers.get(f"dockvm-{mid}")
            .exec_run(["systemctl", "show", "-p", "MainPID", "--value", "tomcat10"])
            .output.decode()
            .strip()
            for mid in mids
        ]
    finally:
        client.close()


async def _serving(ips: list[str]) -> list[str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        out = []
        for ip in ips:
            async with s.get(f"http://{ip}:8080/") as r:
                out.append((await r.text()).strip())
        return out


async def test_a_rolling_war_release_and_a_broken_one_rolled_back(stack: Stack):  # noqa: F811
    api = stack.api
    spec = stack.spec(app="tomcat", image=IMAGE, memory="512m", count=2)
    async with api.post("/v1/machines?wait=240", json=spec) as r:
        assert r.status == 202, await r.text()
    machines = sorted(await _machines(api, app="tomcat", state="running"), key=lambda m: m["id"])
    ips = [m["ip"] for m in machines]
    assert len(ips) == 2

    v1 = await _finished(api, (await _start(api, release("1.0.0")))["id"], timeout=400)
    assert (v1["status"], len(v1["batches"])) == ("succeeded", 2), v1
    served_v1 = await _serving(ips)
    pids_v1 = _tomcat_pids([m["id"] for m in machines])
    # 2.0.0 reloaded: Tomcat redeploys the war in the same JVM.
    v2 = await _finished(api, (await _start(api, release("2.0.0", "reload")))["id"], timeout=400)
    assert v2["status"] == "succeeded", v2
    served_v2 = await _serving(ips)
    pids_v2 = _tomcat_pids([m["id"] for m in machines])
    v3 = await _finished(api, (await _start(api, release("3.0.0")))["id"], timeout=400)
    served_v3 = await _serving(ips)

    assert served_v1 == ["war-app 1.0.0"] * 2
    assert served_v2 == ["war-app 2.0.0"] * 2
    assert pids_v2 == pids_v1 and "0" not in pids_v1  # reloaded, not restarted
    first, second = v3["batches"]
    assert v3["status"] == "failed"
    assert [(v3["machines"][m]["status"], v3["machines"][m]["rolled_back"]) for m in first] == [
        ("failed", True)]
    assert [v3["machines"][m]["status"] for m in second] == ["pending"]
    assert served_v3 == ["war-app 2.0.0"] * 2
