"""Monitoring on Prometheus, end to end on the real stack: ipam, one provisioner agent, its
monitor and the gateway as real processes, with a Prometheus and an Alertmanager of the test's
own (Debian's binaries, the repo's templates, scraping every 2 s) that find their targets
through the gateway's discovery only.

Every machine and network made here is removed at the end (by this run's network prefix).
Waits are on conditions (a point in the API, an audit entry), never fixed sleeps.
"""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import docker
import pytest

from tests.support.prometheus import AlertmanagerProcess, PrometheusProcess, wait_for
from tests.support.stack import free_port

IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dvp{RUN}"
HOST = f"pm-{RUN}"


@dataclass
class Mon:
    """The running services, the test's Prometheus and an admin client of the gateway."""

    api: aiohttp.ClientSession
    prom: PrometheusProcess
    net: str
    vlan: int

    def spec(self, **over: object) -> dict:
        """A machine spec on this run's one-address pool."""
        return {"app": "mon", "image": IMAGE, "cpus": 0.5, "memory": "256m", "disk": "1g",
                "dc": "dc1", "vlan_id": self.vlan, **over}

    async def create(self, **over: object) -> dict:
        """One running machine."""
        async with self.api.post("/v1/machines?wait=120", json=self.spec(**over)) as r:
            assert r.status == 202, await r.text()
            mid = (await r.json())["machines"][0]["id"]
        async with self.api.get(f"/v1/machines/{mid}") as r:
            machine = await r.json()
        assert machine["state"] == "running", machine
        return machine

    async def metrics(self, ip: str, **params: str) -> dict:
        """``GET /v1/ips/{ip}/metrics`` (200 expected)."""
        async with self.api.get(f"/v1/ips/{ip}/metrics", params=params) as r:
            body = await r.json()
            assert r.status == 200, body
        return body


def _cleanup() -> None:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        nets = [n for n in client.networks.list() if n.name.startswith(PREFIX)]
        for net in nets:
            net.reload()
            for cid in net.attrs.get("Containers") or {}:
                client.containers.get(cid).remove(force=True)
            net.remove()
    finally:
        client.close()


@pytest.fixture
async def mon(start_service, service_env, tmp_path: Path) -> AsyncIterator[Mon]:
    """ipam, an agent, its monitor, the gateway, Prometheus and Alertmanager; a pool of one IP."""
    n = random.randint(100, 250)
    net, vlan = f"10.239.{n}", 2300 + n  # 10.239: no other test or bench uses it
    secret = uuid.uuid4().hex
    secret_file = tmp_path / "gateway.secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    gw_port, agent_port, monitor_port = free_port(), free_port(), free_port()
    am = await AlertmanagerProcess(
        tmp_path / "am", f"http://127.0.0.1:{gw_port}/v1/prometheus/alerts", secret_file
    ).start()
    prom = PrometheusProcess(tmp_path / "prom", f"http://127.0.0.1:{gw_port}", secret,
                             alertmanager=am.addr)
    try:
        await prom.start()
        await start_service("ipam")
        await start_service(
            "provisioner", "--host-id", HOST, port=agent_port,
            env={"DOCKVM_NETWORK_PREFIX": PREFIX, "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
                 "DOCKVM_STOP_TIMEOUT_S": "2", "DOCKVM_STATE_DIR": str(tmp_path / "agent")},
        )
        await start_service(
            "monitor", "--host-id", HOST, port=monitor_port,
            env={"DOCKVM_MONITOR_INTERVAL_S": "2", "DOCKVM_MONITOR_LABEL": f"dockvm.host={HOST}"},
        )
        gateway = await start_service("gateway", port=gw_port, env={
            "DOCKVM_PROMETHEUS_URL": prom.url,
            "DOCKVM_PROMETHEUS_SECRET_FILE": str(secret_file),
            "DOCKVM_PROMETHEUS_SERVICES": f"gateway=127.0.0.1:{gw_port}",
            "DOCKVM_PROMETHEUS_AGENT_PORTS": f"provisioner={agent_port},monitor={monitor_port}",
        })
        token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
        async with aiohttp.ClientSession(
            gateway.url, headers={"Authorization": f"Bearer {token}"}
        ) as api:
            pool = {"name": f"pm{n}", "dc": "dc1", "vlan_id": vlan, "cidr": f"{net}.0/29",
                    "gateway": f"{net}.1", "reserved": [f"{net}.3-{net}.6"], "cooldown_s": 0}
            async with api.post("/v1/pools", json=pool) as r:
                assert r.status == 201, await r.text()
            await wait_for(lambda: _host_online(api), 60, f"host {HOST} online")
            try:
                yield Mon(api, prom, net, vlan)
            finally:
                await _delete_all(api)
    finally:
        await prom.stop()
        await am.stop()
        _cleanup()


async def _host_online(api: aiohttp.ClientSession) -> bool:
    async with api.get("/v1/hosts") as r:
        return any(h["id"] == HOST and h["status"] == "online" for h in (await r.json())["items"])


async def _delete_all(api: aiohttp.ClientSession) -> None:
    async with api.get("/v1/machines", params={"limit": "100"}) as r:
        live = [m["id"] for m in (await r.json())["items"] if m["state"] != "destroyed"]
    for mid in live:
        await _destroy(api, mid)


async def _destroy(api: aiohttp.ClientSession, mid: str) -> None:
    async with api.delete(f"/v1/machines/{mid}"):
        pass

    async def gone() -> bool:
        async with api.get(f"/v1/machines/{mid}") as r:
            return (await r.json())["state"] in ("destroyed", "failed")

    await wait_for(gone, 120, f"machine {mid} destroyed")


def _exec(machine_id: str, cmd: list[str]) -> None:
    """Start ``cmd`` in the machine's container, detached (the test made this machine)."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    try:
        (c,) = client.api.containers(filters={"label": f"dockvm.machine_id={machine_id}"})
        exec_id = client.api.exec_create(c["Id"], cmd)["Id"]
        client.api.exec_start(exec_id, detach=True)
    finally:
        client.close()


def _since(minutes: float) -> str:
    return (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat()


async def test_busy_machine_reads_its_quota_week_query_answers_and_restart_keeps_history(
    mon: Mon,
):
    # A quarter of a CPU: within reach of a busy loop on a loaded 2-core host, and far from
    # what the host's share would read (0.25 of 2 CPUs, 12.5%).
    m = await mon.create(cpus=0.25)
    _exec(m["id"], ["sh", "-c", "while :; do :; done"])

    async def busy() -> list[dict[str, Any]]:
        body = await mon.metrics(m["ip"], step="raw", **{"from": _since(5)})
        return [p for p in body["points"] if (p["cpu_percent"] or 0) > 60]

    hot = await wait_for(busy, 120, "a raw point of the busy machine over 60% of its quota")
    week = await mon.metrics(m["ip"], step="10m", **{"from": _since(7 * 24 * 60)})

    async def history() -> dict | None:
        body = await mon.metrics(m["ip"], step="10s", **{"from": _since(10)})
        throttled = any(p["cpu_throttled_s"] > 0 for p in body["points"])
        return body if len(body["points"]) > 3 and throttled else None

    # A counter through Prometheus too: at its quota the machine is throttled.
    before = await wait_for(history, 120, "four 10 s points, one with throttling")
    await mon.prom.stop()
    await mon.prom.start()
    after = await mon.metrics(m["ip"], step="10s", **{"from": before["from"], "to": before["to"]})

    # Its quota burnt (nearly) fully: ~100% of it, not 12.5% of the host's CPUs.
    assert 60 < hot[-1]["cpu_percent"] < 110
    assert {p["machine_id"] for p in hot} == {m["id"]}
    assert week["step"] == "10m" and week["points"], week
    assert week["points"][-1]["mem_limit"] == 256 << 20
    assert [o["machine_id"] for o in week["owners"]] == [m["id"]]
    # The newest bucket may still be filling (it ends after ``to``); every older one is kept.
    assert after["points"][:-1] == before["points"][:-1]


async def test_ip_reused_after_cooldown_shows_both_owners_split(mon: Mon):
    first = await mon.create()
    t0 = _since(1)
    await wait_for(lambda: _points(mon, first["ip"], t0), 120, "a point of the first owner")
    await _destroy(mon.api, first["id"])
    second = await mon.create()

    async def both() -> dict | None:
        body = await mon.metrics(first["ip"], step="10s", **{"from": t0})
        owners = {p["machine_id"] for p in body["points"]}
        return body if owners == {first["id"], second["id"]} else None

    body = await wait_for(both, 120, "points of both owners of the IP")
    ids = [p["machine_id"] for p in body["points"]]
    released = datetime.fromisoformat(body["owners"][0]["until"])

    assert second["ip"] == first["ip"]
    assert [o["machine_id"] for o in body["owners"]] == [first["id"], second["id"]]
    # Split at the change of owner: every point of the first before every point of the second.
    assert ids == sorted(ids, key=lambda i: i != first["id"])
    assert all(
        datetime.fromisoformat(p["t"]) < released
        for p in body["points"] if p["machine_id"] == first["id"]
    )


async def _points(mon: Mon, ip: str, since: str) -> list:
    return (await mon.metrics(ip, step="10s", **{"from": since}))["points"]


async def test_an_oom_killed_machine_raises_an_alert_in_the_audit_log(mon: Mon):
    m = await mon.create()
    _exec(m["id"], ["python3", "-c", "b = bytearray(2000 << 20)"])

    async def alert() -> list[dict]:
        async with mon.api.get("/v1/audit", params={"who": "alertmanager"}) as r:
            items = (await r.json())["items"]
        return [
            e for e in items
            if e["event"] == "alert.firing" and e["detail"]["alert"] == "MachineOomKilled"
            and e["target"] == m["id"]
        ]

    (entry,) = await wait_for(alert, 120, "the OOM alert in the audit log")
    assert entry["detail"]["labels"]["ip"] == m["ip"]
    assert entry["role"] == "monitoring"


async def test_discovery_and_alert_routes_refuse_anything_but_the_monitoring_credential(
    mon: Mon,
):
    async with mon.api.get("/v1/prometheus/targets") as r:  # the admin token is not it
        status = r.status
    async def agents_up() -> set[str]:
        up = await mon.prom.query(f'up{{host="{HOST}"}} == 1')
        apps = {t["metric"]["app"] for t in up}
        return apps if apps == {"provisioner", "monitor"} else set()

    apps = await wait_for(agents_up, 60, "both agents of the host scraped through discovery")
    async with aiohttp.ClientSession() as anon, anon.post(
        mon.api._base_url.join(aiohttp.client.URL("/v1/prometheus/alerts")), json={"alerts": []}
    ) as r:
        anonymous = r.status
    assert (status, anonymous) == (401, 401)
    assert apps == {"provisioner", "monitor"}



async def test_node_exporter_reports_the_machines_own_memory_and_is_found_by_discovery(
    mon: Mon,
):
    m = await mon.create()  # 256m, 0.5 CPU
    sel = f'{{machine_id="{m["id"]}"}}'

    async def scraped() -> list[dict]:
        return await mon.prom.query(f"node_memory_MemTotal_bytes{sel}")

    (mem,) = await wait_for(scraped, 120, "the machine's node exporter scraped")
    cpus = await mon.prom.query(f'count(node_cpu_seconds_total{{machine_id="{m["id"]}",'
                                'mode="idle"})')
    # The data disk the MachineDataDiskNearlyFull rule watches.
    data = await mon.prom.query(
        f'node_filesystem_size_bytes{{machine_id="{m["id"]}",mountpoint="/data"}}'
    )

    # LXCFS's /proc: the machine's limit and CPU count, not the host's.
    assert float(mem["value"][1]) == 256 << 20
    assert float(cpus[0]["value"][1]) == 1
    assert 0.9e9 < float(data[0]["value"][1]) <= 1 << 30  # the 1g disk (less XFS's own)
    assert {k: mem["metric"][k] for k in ("ip", "app", "dc", "host")} == {
        "ip": m["ip"], "app": "mon", "dc": "dc1", "host": HOST
    }
    assert mem["metric"]["instance"] == f"{m['ip']}:9100"
