"""Benchmark: an IP's metrics history through the gateway against the same PromQL sent straight
to Prometheus, in one run.

It writes a week of 10 s samples of one IP (the series the monitor exposes, as Prometheus would
have scraped them) into a fresh Prometheus data directory with ``promtool tsdb
create-blocks-from openmetrics``, starts Debian's Prometheus on it (and waits until it has
compacted them, as a week-old one has), and ipam and the gateway as subprocesses (fresh vhost
and database; the gateway's ``DOCKVM_PROMETHEUS_URL`` at that Prometheus). Then, alternately,
for a 1-hour ``raw`` query and a 1-week ``10m`` query:

- ``gateway``: ``GET /v1/ips/{ip}/metrics`` (ipam's owners asked at the same time, the points
  built, JSON out);
- ``direct``: the same four concurrent ``query_range`` the gateway sends, straight to
  Prometheus's HTTP API.

Beside them, the floor of any API call: ``GET /v1/machines?limit=1`` (the bearer token checked
in the database, the list served from memory).

Targets: 1 week <= 100 ms at p50 through the gateway, and the gateway <= 1.3x the direct query.
The former FerretDB store's figures (removed) are printed beside, from docs/benchmarks.md.

Usage: ``.venv/bin/python -m bench.monitor_history [--reps N]``
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from pymongo import AsyncMongoClient

from bench._common import machine, median, percentile
from services.gateway.domain.metrics import bucket_range, history_queries, step_seconds
from tests.support.prometheus import PrometheusProcess
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

INTERVAL_S = 10
IP = "10.77.0.1"
# The former store (one FerretDB table per IP and day), docs/benchmarks.md, 2026-11: p50 ms.
OLD = {"1h": 440.0, "1w": 3400.0}
_GAUGES = ("cpu_percent", "memory_usage_bytes", "memory_working_set_bytes",
           "memory_limit_bytes", "pids")
_COUNTERS = ("cpu_throttled_seconds", "oom_kills", "network_receive_bytes",
             "network_transmit_bytes", "network_receive_packets", "network_transmit_packets",
             "blkio_read_bytes", "blkio_write_bytes")


def _openmetrics(path: Path, end: int) -> int:
    """A week of samples of IP's series ending at ``end`` (epoch s), OpenMetrics text."""
    labels = (f'ip="{IP}",machine_id="m-bench",app="bench",host="h1",instance="h1:9104",'
              'job="dockvm"')
    n = WEEK // INTERVAL_S
    start = end - n * INTERVAL_S
    count = 0
    with path.open("w") as f:
        for name in _GAUGES:
            f.write(f"# TYPE dockvm_container_{name} gauge\n")
            for k in range(n):
                f.write(f"dockvm_container_{name}{{{labels}}} {k % 100} {start + k * INTERVAL_S}\n")
            count += n
        for name in _COUNTERS:
            f.write(f"# TYPE dockvm_container_{name} counter\n")
            for k in range(n):
                f.write(f"dockvm_container_{name}_total{{{labels}}} {k * 7} "
                        f"{start + k * INTERVAL_S}\n")
            count += n
        f.write("# EOF\n")
    return count


WEEK = 7 * 24 * 3600


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {err.decode()[-500:]}")


async def _compacted(url: str) -> None:
    """Wait until Prometheus has compacted the imported 2 h blocks (as a week-old one has):
    its block count unchanged over three reads 2 s apart, after a first compaction."""
    seen: list[float] = []
    async with aiohttp.ClientSession() as s:
        while len(seen) < 3 or len(set(seen[-3:])) > 1:
            async with s.get(f"{url}/metrics") as r:
                text = await r.text()
            values = dict(line.split(" ", 1) for line in text.splitlines()
                          if line.startswith(("prometheus_tsdb_blocks_loaded ",
                                              "prometheus_tsdb_compactions_total ")))
            if float(values.get("prometheus_tsdb_compactions_total", 0)) > 0:
                seen.append(float(values["prometheus_tsdb_blocks_loaded"]))
            await asyncio.sleep(2)
    print(f"prometheus compacted the import into {seen[-1]:.0f} blocks")


async def _time(fn: Callable[[], Awaitable[object]]) -> float:
    t = time.perf_counter()
    await fn()
    return (time.perf_counter() - t) * 1000


async def _measure(
    api: aiohttp.ClientSession, peer: aiohttp.ClientSession, prom_url: str, reps: int
) -> dict:
    """p50/p99 of each query through the gateway and direct, alternately."""
    out = {}
    now = datetime.now(UTC)
    for label, span, step in (("1h", timedelta(hours=1), "raw"), ("1w", timedelta(days=7), "10m")):
        start, end = now - span, now
        params = {"from": start.isoformat(), "to": end.isoformat(), "step": step}
        s = step_seconds(step)
        first, last = bucket_range(start, end, s)
        forms = [{"query": q, "start": str(first), "end": str(last), "step": str(s)}
                 for q in history_queries(IP, s)]
        points = 0

        async def gateway(params=params) -> None:
            nonlocal points
            async with api.get(f"/v1/ips/{IP}/metrics", params=params) as r:
                body = await r.json()
                assert r.status == 200, body
                points = len(body["points"])

        async def one(form: dict) -> None:
            async with peer.post(f"{prom_url}/api/v1/query_range", data=form) as r:
                body = await r.json()
                assert body["status"] == "success", body

        async def direct(forms=forms) -> None:
            await asyncio.gather(*(one(f) for f in forms))

        gw, di = [], []
        for _ in range(2):  # warm both paths (Prometheus's block cache, the gateway's session)
            await gateway()
            await direct()
        for _ in range(reps):
            gw.append(await _time(gateway))
            di.append(await _time(direct))
        out[label] = (gw, di, points)

    async def floor() -> None:
        async with api.get("/v1/machines", params={"limit": "1"}) as r:
            assert r.status == 200, await r.text()

    out["floor"] = ([await _time(floor) for _ in range(reps)], [], 0)
    return out


@dataclass
class WeekStack:
    """A Prometheus holding a week of one IP, and ipam + a gateway reading from it."""

    tmp: Path
    db: str
    prom_url: str
    gateway_url: str
    token: str


@asynccontextmanager
async def week_stack(name: str) -> AsyncIterator[WeekStack]:
    """Fill a week of samples, start Prometheus, ipam and a gateway on a fresh vhost and
    database; stop and remove all of it at the end (also on error)."""
    tmp = Path(tempfile.mkdtemp(prefix=f"dockvm-bench-{name}-"))
    end = int(time.time()) // INTERVAL_S * INTERVAL_S
    t = time.perf_counter()
    n = _openmetrics(tmp / "week.om", end)
    await _run("promtool", "tsdb", "create-blocks-from", "openmetrics",
               str(tmp / "week.om"), str(tmp / "prom" / "data"))
    (tmp / "week.om").unlink()
    print(machine())
    print(f"filled {n} samples (1 IP x 13 series x 1 week at {INTERVAL_S}s) in "
          f"{time.perf_counter() - t:.0f}s")
    vhost = await create_vhost()
    db = f"bench_{name}_{uuid.uuid4().hex[:8]}"
    gw_port = free_port()
    prom = PrometheusProcess(tmp / "prom", f"http://127.0.0.1:{gw_port}", uuid.uuid4().hex,
                             scrape_interval="10s")
    env = {"DOCKVM_AMQP_URL": vhost.url, "DOCKVM_MONGO_URL": MONGO_URL, "DOCKVM_MONGO_DB": db,
           "DOCKVM_STATE_DIR": str(tmp / "state"), "DOCKVM_WEBHOOK_SECRET": "bench"}
    procs: list[ServiceProcess] = []
    try:
        await prom.start()
        await _compacted(prom.url)
        for svc_name, port, extra in (("ipam", free_port(), {}),
                                      ("gateway", gw_port, {"DOCKVM_PROMETHEUS_URL": prom.url})):
            svc = ServiceProcess(svc_name, {**env, **extra}, port, log_path=tmp / f"{svc_name}.log")
            procs.append(svc)
            await svc.start()
        token = (tmp / "state" / "admin.token").read_text().strip()
        yield WeekStack(tmp, db, prom.url, procs[-1].url, token)
    finally:
        for svc in reversed(procs):
            await svc.stop()
        await prom.stop()
        mongo: AsyncMongoClient = AsyncMongoClient(MONGO_URL)
        try:
            await mongo.drop_database(db)
        finally:
            await mongo.close()
        await delete_vhost(vhost)
        shutil.rmtree(tmp, ignore_errors=True)


async def main() -> None:
    """Fill, start, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="repetitions per query")
    args = parser.parse_args()
    async with week_stack("monhist") as st, aiohttp.ClientSession(
        st.gateway_url, headers={"Authorization": f"Bearer {st.token}"}
    ) as api, aiohttp.ClientSession() as peer:
        results = await _measure(api, peer, st.prom_url, args.reps)
    print(f"{'query':<14} {'points':>6} {'gateway p50':>12} {'p99':>8} {'direct p50':>11} "
          f"{'p99':>8} {'ratio':>6} {'former p50':>11}")
    floor = results.pop("floor")[0]
    for label, (gw, di, points) in results.items():
        name = "1 h raw" if label == "1h" else "1 week 10m"
        print(f"{name:<14} {points:>6} {median(gw):>10.1f}ms {percentile(gw, 99):>6.1f}ms "
              f"{median(di):>9.1f}ms {percentile(di, 99):>6.1f}ms "
              f"{median(gw) / median(di):>5.2f}x {OLD[label]:>9.0f}ms")
    print(f"any API call's floor (bearer token check, GET /v1/machines?limit=1): p50 "
          f"{median(floor):.1f}ms p99 {percentile(floor, 99):.1f}ms")


if __name__ == "__main__":
    asyncio.run(main())
