"""The gateway API: batch create and destroy against bare ``docker run``, and list throughput.

1. For each batch size N (10, 50, 100 by default): ``POST /v1/machines`` of N machines with
   ``?wait`` (IP from ipam, placement, the provisioner's container with its XFS disk, LXCFS and
   sshd), then N parallel ``DELETE``s until every machine is destroyed; against N parallel bare
   ``docker run -d`` of the same image on the same Docker network with the same limits, then N
   parallel ``docker rm -f``, in the same run. It prints each ratio, the cost per machine, where
   the time went (when the last machine reached each state), and how the cost per machine grows
   from the smallest batch to the largest. Targets: create <= 2x at 50 and 100 on one host; the
   cost per machine at 100 within 1.2x of that at 10.
2. ``GET /v1/machines?limit=100`` (16 clients) with 1,000 machines stored: requests/s and p99,
   served from the gateway's in-memory index, against bare aiohttp handlers that run the same
   query on the database, on the full machine documents (the first layout) and on the summary
   documents (the layout before the index), in the same run. Target: p99 <= 500 ms.

Runs ipam, one provisioner and the gateway as subprocesses on a fresh vhost and database, and
removes every container, network and volume it made.

    .venv/bin/python -m bench.api [--batches 10,50,100] [--rounds 1] [--seconds 10]

``--seconds 0`` runs the batches alone, without the listing round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import docker
import docker.errors
from aiohttp import web

from bench._common import machine, median, percentile
from bench._cpu import PARTIES, CpuMeter
from libs.common.db import mongo_client
from services.gateway.service import SagaDriver
from services.gateway.settings import GatewaySettings
from services.gateway.store import GatewayStore
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

IMAGE = "dockvm/base:bookworm"
RUN = uuid.uuid4().hex[:6]
PREFIX = f"dvb{RUN}"
# The machine the scaling issue was measured with: small, so a batch of 100 fits one 2-core host.
CPUS, MEMORY, DISK = "0.05", "64m", "512m"
STATES = ("ip_assigned", "placed", "creating", "running")


@dataclass
class Round:
    """One batch: dockvm's and the bare engine's create and destroy times, and the timeline."""

    n: int
    ours: float
    bare: float
    ours_destroy: float
    bare_destroy: float
    timeline: dict[str, float]
    ids: list[str]
    # CPU seconds by party (bench/_cpu.py) while the batch was created, dockvm's and bare's
    cpu: dict[str, float]
    bare_cpu: dict[str, float]


async def _sh(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {err.decode().strip()}")


async def _bare_batch(
    n: int, net: str, x: int, tag: str, meter: CpuMeter
) -> tuple[float, float]:
    """N parallel ``docker run -d``, then N parallel ``docker rm -f``: their wall times."""
    names = [f"{PREFIX}-{tag}-{i}" for i in range(n)]
    meter.start()
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            _sh(
                "docker",
                "run",
                "-d",
                "--name",
                name,
                "--label",
                f"dockvm-bench={RUN}",
                "--network",
                net,
                "--ip",
                f"10.234.{x + 1 + i // 250}.{i % 250 + 1}",
                "--cpus",
                CPUS,
                "--memory",
                MEMORY,
                IMAGE,
            )
            for i, name in enumerate(names)
        )
    )
    created = time.perf_counter() - t0
    meter.stop()
    t0 = time.perf_counter()
    await asyncio.gather(*(_sh("docker", "rm", "-f", name) for name in names))
    return created, time.perf_counter() - t0


async def _get(api: aiohttp.ClientSession, mid: str) -> dict:
    async with api.get(f"/v1/machines/{mid}") as r:
        return await r.json()


def _timeline(items: list[dict]) -> dict[str, float]:
    """Seconds from the request to the last machine reaching each state (and running's median)."""
    first = min(datetime.fromisoformat(m["created_at"]) for m in items)
    out: dict[str, float] = {}
    for state in STATES:
        reached = sorted(
            (datetime.fromisoformat(t["at"]) - first).total_seconds()
            for m in items
            for t in m["transitions"]
            if t["state"] == state
        )
        out[f"last {state}"] = reached[-1] if reached else float("nan")
        if state == "running" and reached:
            out["first running"], out["median running"] = reached[0], median(reached)
    return out


async def _destroy_all(api: aiohttp.ClientSession, ids: list[str]) -> float:
    """N parallel DELETEs, then wait until every machine is destroyed; the wall time."""
    t0 = time.perf_counter()

    async def delete(mid: str) -> None:
        while True:  # a 503 (the database busy) is answered again, as a client would
            async with api.delete(f"/v1/machines/{mid}") as r:
                if r.status != 503:
                    assert r.status in (202, 200, 404), (r.status, await r.text())
                    return
            await asyncio.sleep(0.2)

    await asyncio.gather(*(delete(mid) for mid in ids))
    while True:
        items = await asyncio.gather(*(_get(api, mid) for mid in ids))
        if all(m["state"] == "destroyed" for m in items):
            return time.perf_counter() - t0
        await asyncio.sleep(0.3)


async def bench_batch(
    api: aiohttp.ClientSession, n: int, vlan: int, net: str, x: int, tag: str
) -> Round:
    """One round at batch size N: dockvm create and destroy, then the bare engine's."""
    spec = {
        "app": f"bench{tag}",
        "image": IMAGE,
        "cpus": float(CPUS),
        "memory": MEMORY,
        "disk": DISK,
        "dc": "dc1",
        "vlan_id": vlan,
        "count": n,
    }
    meter, bare_meter = CpuMeter(), CpuMeter()
    meter.start()
    t0 = time.perf_counter()
    async with api.post("/v1/machines?wait=900", json=spec) as resp:
        body = await resp.json()
        assert resp.status in (200, 201, 202), body
    ours = time.perf_counter() - t0
    meter.stop()
    ids = [m["id"] for m in body["machines"]]
    items = await asyncio.gather(*(_get(api, mid) for mid in ids))
    states = {m["state"] for m in items}
    if states != {"running"}:
        reasons = {m["reason"] for m in items if m["reason"]}
        raise RuntimeError(f"batch {n}: not all running: {states} {reasons}")
    timeline = _timeline(items)
    ours_destroy = await _destroy_all(api, ids)
    bare, bare_destroy = await _bare_batch(n, net, x, tag, bare_meter)
    return Round(
        n, ours, bare, ours_destroy, bare_destroy, timeline, ids, meter.seconds, bare_meter.seconds
    )


def _report_batches(rounds: list[Round]) -> None:
    sizes = sorted({r.n for r in rounds})
    print(
        "| N | dockvm create s | bare docker run s | ratio | per machine (dockvm / bare) s "
        "| dockvm destroy s | bare rm -f s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    per: dict[int, float] = {}
    for n in sizes:
        rs = [r for r in rounds if r.n == n]
        ours, bare = median([r.ours for r in rs]), median([r.bare for r in rs])
        od, bd = median([r.ours_destroy for r in rs]), median([r.bare_destroy for r in rs])
        per[n] = ours / n
        print(
            f"| {n} | {ours:.1f} | {bare:.1f} | {ours / bare:.2f}x | {ours / n:.3f} / "
            f"{bare / n:.3f} | {od:.1f} | {bd:.1f} | {od / bd:.2f}x |"
        )
    for n in sizes:
        tl = [r.timeline for r in rounds if r.n == n]
        cells = ", ".join(f"{k} {median([t[k] for t in tl]):.1f}" for k in tl[0])
        print(f"  N={n} timeline (s after the POST): {cells}")
    lo, hi = sizes[0], sizes[-1]
    print(f"cost per machine at {hi} / at {lo}: {per[hi] / per[lo]:.2f}x (target <= 1.2x)")
    _report_cpu(rounds, sizes)


def _report_cpu(rounds: list[Round], sizes: list[int]) -> None:
    """CPU seconds per machine by party while each batch was created, dockvm / bare."""
    cores = os.cpu_count() or 1
    print(f"CPU seconds per machine while creating, dockvm / bare ({cores} cores):")
    print("| N | " + " | ".join(PARTIES) + " | total | busy |")
    print("|---|" + "---|" * (len(PARTIES) + 2))
    for n in sizes:
        rs = [r for r in rounds if r.n == n]

        def cell(key: str, rs: list[Round] = rs, n: int = n) -> str:
            ours = median([r.cpu[key] for r in rs]) / n
            bare = median([r.bare_cpu[key] for r in rs]) / n
            return f"{ours:.3f} / {bare:.3f}"

        # How much of the cores' time the batch kept busy: near 100% means CPU-bound.
        busy_ours = median([r.cpu["total"] / (r.ours * cores) for r in rs])
        busy_bare = median([r.bare_cpu["total"] / (r.bare * cores) for r in rs])
        cells = " | ".join(cell(k) for k in (*PARTIES, "total"))
        print(f"| {n} | {cells} | {busy_ours:.0%} / {busy_bare:.0%} |")


async def _hammer(
    url: str, headers: dict[str, str], seconds: float, clients: int = 16
) -> tuple[float, float]:
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


async def _store_listing(store: GatewayStore) -> None:
    """1,000 running machines with the five transitions a created machine carries."""
    driver = SagaDriver(store, publisher=None, settings=GatewaySettings())  # type: ignore[arg-type]
    spec = {
        "app": "listing",
        "image": IMAGE,
        "cpus": 1,
        "memory": 1 << 30,
        "disk": 1 << 30,
        "dc": "dc1",
        "vlan_id": 1,
    }
    docs = driver.creates.new_machine_docs(spec, driver.new_ids(1000))
    for i, d in enumerate(docs):
        at = d["created_at"]
        d.update(state="running", saga=None, ip=f"10.0.{i // 250}.{i % 250 + 1}", host="h1")
        d["transitions"] = [
            {"state": s, "at": at + timedelta(seconds=k), "reason": None}
            for k, s in enumerate(("requested", *STATES))
        ]
    await store.insert_machines(docs)


async def bench_list(gateway_url: str, token: str, db_name: str, seconds: float) -> dict:
    """Store 1,000 machines, then GET pages through the gateway and through a bare handler."""
    client = mongo_client(MONGO_URL, "dockvm-bench")
    db = client[db_name]
    await _store_listing(GatewayStore(db))
    auth = {"Authorization": f"Bearer {token}"}
    await _until_listed(f"{gateway_url}/v1/machines?app=listing&limit=1000", auth, 1000)

    def bare(collection: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(_: web.Request) -> web.Response:
            items = await db[collection].find({}).sort("_id", 1).limit(101).to_list()
            return web.Response(
                text=json.dumps({"items": items[:100]}, default=str),
                content_type="application/json",
            )

        return handler

    app = web.Application()
    app.router.add_get("/machines", bare("machines"))
    app.router.add_get("/summaries", bare("machine_summaries"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        ours = await _hammer(f"{gateway_url}/v1/machines?limit=100", auth, seconds)
        peer = await _hammer(f"http://127.0.0.1:{port}/machines", {}, seconds)
        summaries = await _hammer(f"http://127.0.0.1:{port}/summaries", {}, seconds)
    finally:
        await runner.cleanup()
        await client.close()
    return {"ours": ours, "peer": peer, "summaries": summaries}


async def _until_listed(url: str, auth: dict[str, str], count: int) -> None:
    """Wait until the gateway lists ``count`` machines (its index reloads on a timer)."""
    async with aiohttp.ClientSession(headers=auth) as s:
        async with asyncio.timeout(60):
            while True:
                async with s.get(url) as r:
                    if len((await r.json())["items"]) >= count:
                        return
                await asyncio.sleep(0.2)


def _destroy_steps(prov_log: Path, ids: list[str]) -> str:
    """Where the agent's destroys of ``ids`` spent their time: per step, the median and the
    total over the batch (the agent logs each destroy's steps)."""
    wanted, steps = set(ids), {}
    for line in prov_log.read_text().splitlines():
        if '"machine destroyed"' not in line:
            continue
        rec = json.loads(line)
        if rec.get("machine_id") in wanted:
            for step, sec in (rec.get("seconds") or {}).items():
                steps.setdefault(step, []).append(sec)
    parts = [f"{k} {median(v):.2f}s median, {sum(v):.1f}s total" for k, v in steps.items()]
    return "agent destroy steps: " + ("; ".join(parts) or "none logged")


def _services(env: dict[str, str], tmp: Path) -> list[ServiceProcess]:
    return [
        ServiceProcess("ipam", env, free_port(), log_path=tmp / "ipam.log"),
        ServiceProcess(
            "provisioner",
            # info: its "machine destroyed" lines carry each step's seconds (_destroy_steps).
            {**env, "DOCKVM_STATE_DIR": str(tmp / "agent"), "DOCKVM_LOG_LEVEL": "info"},
            free_port(),
            ["--host-id", f"bench-{RUN}"],
            log_path=tmp / "prov.log",
        ),
        # 100 machines of 0.05 CPU on a 2-core box: past the default 4x CPU overcommit.
        ServiceProcess(
            "gateway",
            {**env, "DOCKVM_OVERCOMMIT_CPU": "16"},
            free_port(),
            log_path=tmp / "gateway.log",
        ),
    ]


async def _setup(api: aiohttp.ClientSession, vlan: int, x: int) -> None:
    """The VLAN's pool, a host heartbeat, and one machine so the network and image are warm.

    The pool is 10.234.x.0/22: dockvm's machines get the first /24, the bare containers the rest.
    """
    pool = {
        "name": "bench",
        "dc": "dc1",
        "vlan_id": vlan,
        "cidr": f"10.234.{x}.0/22",
        "gateway": f"10.234.{x}.1",
        "reserved": [f"10.234.{x + 1}.0-10.234.{x + 3}.254"],
        "cooldown_s": 0,
    }
    async with api.post("/v1/pools", json=pool) as r:
        assert r.status == 201, await r.text()
    while True:
        async with api.get("/v1/hosts") as r:
            if (await r.json())["items"]:
                break
        await asyncio.sleep(0.2)
    async with api.post(
        "/v1/machines?wait=300",
        json={
            "app": "warm",
            "image": IMAGE,
            "cpus": 0.5,
            "memory": "256m",
            "disk": "1g",
            "dc": "dc1",
            "vlan_id": vlan,
        },
    ) as r:
        assert r.status in (200, 201, 202), await r.text()


async def main(batches: list[int], rounds: int, seconds: float) -> None:
    """Run both benchmarks and print medians and ratios."""
    vhost = await create_vhost()
    db_name = f"bench_{uuid.uuid4().hex[:10]}"
    tmp = Path(tempfile.mkdtemp(prefix="dockvm-bench-"))
    x = random.randint(0, 63) * 4  # the pool is 10.234.x.0/22
    vlan = 2000 + x
    env = {
        "DOCKVM_AMQP_URL": vhost.url,
        "DOCKVM_MONGO_URL": MONGO_URL,
        "DOCKVM_MONGO_DB": db_name,
        "DOCKVM_STATE_DIR": str(tmp / "gw"),
        "DOCKVM_NETWORK_PREFIX": PREFIX,
        "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
        "DOCKVM_STOP_TIMEOUT_S": "2",
        "DOCKVM_LOG_LEVEL": "warning",
    }
    procs = _services(env, tmp)
    try:
        for p in procs:
            await p.start()
        gw = procs[-1]
        token = (tmp / "gw" / "admin.token").read_text().strip()
        async with aiohttp.ClientSession(
            gw.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=1200),
        ) as api:
            await _setup(api, vlan, x)
            print(f"# bench/api.py — {machine()}")
            print(f"## batches {batches} of {CPUS} CPU, {MEMORY}, {DISK} disk; {rounds} round(s)")
            done: list[Round] = []
            for r in range(rounds):
                for n in batches:
                    one = await bench_batch(api, n, vlan, f"{PREFIX}-vlan{vlan}", x, f"{r}x{n}")
                    print(
                        f"  round {r + 1} N={n}: dockvm {one.ours:.1f}s (destroy "
                        f"{one.ours_destroy:.1f}s), docker {one.bare:.1f}s (rm "
                        f"{one.bare_destroy:.1f}s)",
                        flush=True,
                    )
                    print(f"    {_destroy_steps(tmp / 'prov.log', one.ids)}", flush=True)
                    done.append(one)
        if done:
            _report_batches(done)
        if seconds <= 0:
            return  # --seconds 0: batches only, no listing round
        print(f"## GET /v1/machines?limit=100 with 1,000 machines, 16 clients, {seconds:g}s each")
        res = await bench_list(gw.url, token, db_name, seconds)
        (rps, p99), (prps, pp99) = res["ours"], res["peer"]
        srps, sp99 = res["summaries"]
        print(f"gateway (in-memory index)        {rps:.0f} req/s, p99 {p99 * 1000:.0f} ms")
        print(f"same query, full documents       {prps:.0f} req/s, p99 {pp99 * 1000:.0f} ms")
        print(f"same query, summary documents    {srps:.0f} req/s, p99 {sp99 * 1000:.0f} ms")
        print(f"ratio (throughput)               {rps / prps:.2f}x; p99 target <= 500 ms")
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


def _remove_bare() -> None:
    client = docker.from_env()
    for c in client.containers.list(all=True, filters={"label": f"dockvm-bench={RUN}"}):
        c.remove(force=True)
    client.close()


def _cleanup_engine(tmp: Path) -> None:
    client = docker.from_env()
    for c in client.containers.list(all=True, filters={"label": "dockvm.machine_id"}):
        nets = c.attrs["NetworkSettings"]["Networks"] or {}
        if any(name.startswith(PREFIX) for name in nets):
            c.remove(force=True)
    for net in client.networks.list():
        if net.name.startswith(PREFIX):
            try:
                net.remove()
            except docker.errors.APIError as err:
                # moby#17217: a network can keep phantom endpoints after many parallel removals.
                print(f"warning: network {net.name} not removed: {err.explanation}")
    client.close()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        if line.split()[1].startswith(str(tmp)):
            subprocess.run(["umount", "-l", line.split()[1]], check=False)
    out = subprocess.run(
        ["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        if str(tmp) in line:
            subprocess.run(["losetup", "-d", line.split()[0]], check=False)
    # The machines' disk files (GBs for a 100-machine batch); the services' logs stay.
    shutil.rmtree(tmp / "agent", ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", default="10,50,100", type=lambda s: [int(n) for n in s.split(",") if n]
    )
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    asyncio.run(main(args.batches, args.rounds, args.seconds))
