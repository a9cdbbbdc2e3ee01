"""The gateway API: create latency against bare ``docker run``, and list throughput.

1. ``POST /v1/machines`` of N machines with ``?wait`` (IP from ipam, placement, the provisioner's
   container with its XFS disk, LXCFS and sshd) against N parallel bare ``docker run -d`` of the
   same image on the same Docker network with the same limits, in the same run. Target: <= 1.5x.
2. ``GET /v1/machines`` (pages of 100, 16 clients) with 1,000 machines stored: requests/s and
   p99, against a bare aiohttp handler that runs the same MongoDB query and dumps the documents
   (no auth, no models), in the same run.

Runs ipam, one provisioner and the gateway as subprocesses on a fresh vhost and database, and
removes every container, network and volume it made.

    .venv/bin/python -m bench.api [--machines 20] [--rounds 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import aiohttp
import docker
from aiohttp import web

from bench._common import machine, median, percentile
from libs.common.db import mongo_client
from services.gateway.service import SagaDriver
from services.gateway.settings import GatewaySettings
from services.gateway.store import GatewayStore
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

IMAGE = "dockvm/base:bookworm"
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dvb{RUN}"


async def _docker_run(net: str, ip: str, name: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "docker", "run", "-d", "--name", name, "--label", f"dockvm-bench={RUN}",
        "--network", net, "--ip", ip, "--cpus", "0.5", "--memory", "256m", IMAGE,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"docker run failed: {err.decode().strip()}")


def _remove_bare() -> None:
    client = docker.from_env()
    for c in client.containers.list(all=True, filters={"label": f"dockvm-bench={RUN}"}):
        c.remove(force=True)
    client.close()


async def _wait_settled(api: aiohttp.ClientSession, ids: list[str]) -> list[dict]:
    while True:
        async with api.get("/v1/machines", params={"ids": ",".join(ids), "limit": "1000"}) as r:
            items = (await r.json())["items"]
        if all(m["pending"] is None for m in items):
            return items
        await asyncio.sleep(0.3)


async def bench_create(api: aiohttp.ClientSession, n: int, rounds: int, net: str, base: str,
                       vlan: int) -> tuple[list[float], list[float]]:
    """Rounds of N machines through the API, then N bare docker runs."""
    spec = {"app": "bench", "image": IMAGE, "cpus": 0.5, "memory": "256m", "disk": "1g",
            "dc": "dc1", "vlan_id": vlan, "count": n}
    ours, bare = [], []
    dispatched: list[float] = []
    for r in range(rounds):
        t0 = time.perf_counter()
        async with api.post("/v1/machines?wait=600", json=spec) as resp:
            body = await resp.json()
        ours.append(time.perf_counter() - t0)
        states = [m["state"] for m in body["machines"]]
        if states != ["running"] * n:
            ids = ",".join(m["id"] for m in body["machines"])
            async with api.get("/v1/machines", params={"ids": ids, "limit": "1000"}) as resp:
                reasons = {m["reason"] for m in (await resp.json())["items"] if m["reason"]}
            raise RuntimeError(f"round {r}: not all running: {states} {reasons}")
        ips = [f"{base}.{200 + i}" for i in range(n)]
        t0 = time.perf_counter()
        await asyncio.gather(*(_docker_run(net, ip, f"{PREFIX}-{r}-{i}")
                               for i, ip in enumerate(ips)))
        bare.append(time.perf_counter() - t0)
        await asyncio.get_running_loop().run_in_executor(None, _remove_bare)
        ids = [m["id"] for m in body["machines"]]
        async with api.get("/v1/machines", params={"ids": ",".join(ids), "limit": "1000"}) as resp:
            items = (await resp.json())["items"]
        dispatched.append(_spread(items, "creating"))
        for mid in ids:
            async with api.delete(f"/v1/machines/{mid}"):
                pass
        await _wait_settled(api, ids)
        print(f"  round {r + 1}: dockvm {ours[-1]:.2f}s (last create command sent after "
              f"{dispatched[-1]:.2f}s), docker run {bare[-1]:.2f}s", flush=True)
    return ours, bare


def _spread(items: list[dict], state: str) -> float:
    """Seconds from the first request to the last machine reaching ``state``."""
    first = min(datetime.fromisoformat(m["created_at"]) for m in items)
    last = max(datetime.fromisoformat(t["at"]) for m in items for t in m["transitions"]
               if t["state"] == state)
    return (last - first).total_seconds()


async def _hammer(url: str, headers: dict[str, str], seconds: float,
                  clients: int = 16) -> tuple[float, float]:
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(s: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            async with s.get(url) as r:
                await r.read()
                assert r.status == 200, r.status
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers) as s:
        await asyncio.gather(*(worker(s) for _ in range(clients)))
    return len(latencies) / (time.perf_counter() - started), percentile(latencies, 99)


async def bench_list(gateway_url: str, token: str, db_name: str, seconds: float) -> dict:
    """Store 1,000 machines, then GET pages through the gateway and through a bare handler."""
    client = mongo_client(MONGO_URL, "dockvm-bench")
    db = client[db_name]
    store = GatewayStore(db)
    driver = SagaDriver(store, publisher=None, settings=GatewaySettings())  # type: ignore[arg-type]
    spec = {"app": "listing", "image": IMAGE, "cpus": 1, "memory": 1 << 30, "disk": 1 << 30,
            "dc": "dc1", "vlan_id": 1}
    docs = driver.creates.new_machine_docs(spec, driver.new_ids(1000))
    for i, d in enumerate(docs):
        d.update(state="running", saga=None, ip=f"10.0.{i // 250}.{i % 250 + 1}", host="h1")
    await store.insert_machines(docs)

    async def bare(_: web.Request) -> web.Response:
        items = await db["machines"].find({}).sort("_id", 1).limit(101).to_list()
        return web.Response(text=json.dumps({"items": items[:100]}, default=str),
                            content_type="application/json")

    app = web.Application()
    app.router.add_get("/machines", bare)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        auth = {"Authorization": f"Bearer {token}"}
        ours = await _hammer(f"{gateway_url}/v1/machines?limit=100", auth, seconds)
        peer = await _hammer(f"http://127.0.0.1:{port}/machines", {}, seconds)
    finally:
        await runner.cleanup()
        await client.close()
    return {"ours": ours, "peer": peer}


async def main(n: int, rounds: int, seconds: float) -> None:
    """Run both benchmarks and print medians and ratios."""
    vhost = await create_vhost()
    db_name = f"bench_{uuid.uuid4().hex[:10]}"
    tmp = Path(tempfile.mkdtemp(prefix="dockvm-bench-"))
    x = random.randint(100, 250)
    base, vlan = f"10.233.{x}", 2000 + x
    env = {"DOCKVM_AMQP_URL": vhost.url, "DOCKVM_MONGO_URL": MONGO_URL,
           "DOCKVM_MONGO_DB": db_name, "DOCKVM_STATE_DIR": str(tmp / "gw"),
           "DOCKVM_NETWORK_PREFIX": PREFIX, "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
           "DOCKVM_STOP_TIMEOUT_S": "2", "DOCKVM_LOG_LEVEL": "warning"}
    procs = [
        ServiceProcess("ipam", env, free_port(), log_path=tmp / "ipam.log"),
        ServiceProcess("provisioner", {**env, "DOCKVM_STATE_DIR": str(tmp / "agent")},
                       free_port(), ["--host-id", f"bench-{RUN}"], log_path=tmp / "prov.log"),
        # 20 machines of 0.5 CPU on a 2-core box need more than the default 4x CPU overcommit.
        ServiceProcess("gateway", {**env, "DOCKVM_OVERCOMMIT_CPU": "16"}, free_port(),
                       log_path=tmp / "gateway.log"),
    ]
    try:
        for p in procs:
            await p.start()
        gw = procs[-1]
        token = (tmp / "gw" / "admin.token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(gw.url, headers=auth) as api:
            pool = {"name": "bench", "dc": "dc1", "vlan_id": vlan, "cidr": f"{base}.0/24",
                    "gateway": f"{base}.1", "reserved": [f"{base}.200-{base}.254"],
                    "cooldown_s": 0}
            async with api.post("/v1/pools", json=pool) as r:
                assert r.status == 201, await r.text()
            while True:
                async with api.get("/v1/hosts") as r:
                    if (await r.json())["items"]:
                        break
                await asyncio.sleep(0.2)
            # Warm-up: the VLAN's network exists and the image is local on both sides.
            async with api.post("/v1/machines?wait=300", json={
                "app": "warm", "image": IMAGE, "cpus": 0.5, "memory": "256m", "disk": "1g",
                "dc": "dc1", "vlan_id": vlan}) as r:
                warm = (await r.json())["machines"][0]["id"]
            net = f"{PREFIX}-vlan{vlan}"
            print(f"# bench/api.py — {machine()}")
            print(f"## POST {n} machines ?wait vs {n} parallel docker run ({rounds} rounds)")
            ours, bare = await bench_create(api, n, rounds, net, base, vlan)
            async with api.delete(f"/v1/machines/{warm}"):
                pass
            await _wait_settled(api, [warm])
        print(f"dockvm POST {n} ?wait   median {median(ours):.2f} s")
        print(f"bare docker run x{n}    median {median(bare):.2f} s")
        print(f"ratio                   {median(ours) / median(bare):.2f}x (target <= 1.5x)")
        print(f"## GET /v1/machines?limit=100 with 1,000 machines, 16 clients, {seconds:g}s each")
        res = await bench_list(gw.url, token, db_name, seconds)
        (rps, p99), (prps, pp99) = res["ours"], res["peer"]
        print(f"gateway                 {rps:.0f} req/s, p99 {p99 * 1000:.1f} ms")
        print(f"bare aiohttp + find     {prps:.0f} req/s, p99 {pp99 * 1000:.1f} ms")
        print(f"ratio (throughput)      {rps / prps:.2f}x")
    finally:
        await asyncio.get_running_loop().run_in_executor(None, _remove_bare)
        for p in reversed(procs):
            if p.proc is not None and p.proc.returncode is None:
                await p.stop()
        client = mongo_client(MONGO_URL, "dockvm-bench")
        await client.drop_database(db_name)
        await client.close()
        await delete_vhost(vhost)
        _cleanup_engine(tmp)


def _cleanup_engine(tmp: Path) -> None:
    import subprocess

    client = docker.from_env()
    for c in client.containers.list(all=True, filters={"label": "dockvm.machine_id"}):
        nets = c.attrs["NetworkSettings"]["Networks"] or {}
        if any(name.startswith(PREFIX) for name in nets):
            c.remove(force=True)
    for net in client.networks.list():
        if net.name.startswith(PREFIX):
            net.remove()
    client.close()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        if line.split()[1].startswith(str(tmp)):
            subprocess.run(["umount", "-l", line.split()[1]], check=False)
    out = subprocess.run(["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"], capture_output=True,
                         text=True, check=False).stdout
    for line in out.splitlines():
        if str(tmp) in line:
            subprocess.run(["losetup", "-d", line.split()[0]], check=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machines", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main(args.machines, args.rounds, args.seconds))
