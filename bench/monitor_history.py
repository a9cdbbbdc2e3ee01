"""Benchmark: the monitor's history queries (``metrics.query`` reads) against a raw ``_id`` read.

In one run and on the same MongoDB API it fills a week of 10 s samples for ``--ips`` IPs through
the store (``add_samples`` of a day of rounds at once per IP, the same documents the sampling
rounds leave), then measures:

- ``raw find_one _id``: one sample fetched by ``_id`` from its (IP, day) table (the peer: the
  least a query must read);
- ``query 1h`` / ``query 1w``: ``MongoSampleStore.samples`` of one IP over an hour and a week,
  followed by the downsampling the ``metrics.query`` handler does (``1m``; ``10m`` for a week);
- ``round``: ``add_samples`` of one sampling round for every IP (the write path), against the
  peer ``insert_many`` of the same samples as flat documents (the former layout);
- with ``--legacy``: the former layout (one document per sample, ``(ip, t)`` index) holding the
  same number of samples for one IP, queried over an hour and a week (once each: it is slow).

It prints medians in ms and the ratio to the peer.

Usage: ``.venv/bin/python -m bench.monitor_history [--mongo-url URL] [--ips N] [--reps N]
[--legacy]``
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address

from pymongo import ASCENDING, IndexModel

from bench._common import machine, median
from libs.common.contracts.monitor import ContainerSample
from libs.common.db import mongo_client
from services.monitor.domain import downsample
from services.monitor.store import MongoSampleStore, history_collection, sample_doc

INTERVAL_S = 10
WEEK_H = 7 * 24
END = datetime(2026, 11, 27, tzinfo=UTC)
START = END - timedelta(hours=WEEK_H)


def _sample(ip: str, t: datetime, i: int) -> dict:
    """A stored sample of the size the monitor writes."""
    s = ContainerSample(
        machine_id=f"m-{ip}", container_id="c" * 64, ip=IPv4Address(ip), app="bench", at=t,
        interval_s=INTERVAL_S, cpu_percent=float(i % 100), cpu_cores=0.1, cpu_quota_cpus=1.0,
        cpu_usage_s=float(i), cpu_throttled_periods=i, cpu_throttled_s=0.0, mem_usage=i,
        mem_working_set=i, mem_rss=i, mem_cache=i, mem_limit=1 << 30, oom_kills=0,
        net_rx_bytes=i, net_tx_bytes=i, net_rx_packets=i, net_tx_packets=i, blk_read_bytes=i,
        blk_write_bytes=i, blk_read_ops=i, blk_write_ops=i, pids=5,
    )
    deltas = {"net_rx_bytes": 100, "net_tx_bytes": 50, "net_rx_packets": 1,
              "net_tx_packets": 1, "blk_read_bytes": 0, "blk_write_bytes": 4096,
              "cpu_throttled_s": 0.0, "oom_kills": 0}
    return sample_doc("bench-host", s, deltas)


async def _fill(store: MongoSampleStore, ips: list[str]) -> int:
    """A week of samples for every IP, written through the store an hour at a time."""
    per_hour = 3600 // INTERVAL_S
    n = 0
    for h in range(WEEK_H):
        hour = START + timedelta(hours=h)
        docs = [_sample(ip, hour + timedelta(seconds=INTERVAL_S * k), k)
                for ip in ips for k in range(per_hour)]
        await store.add_samples(docs)
        n += len(docs)
    return n


async def _time(fn: Callable[[], Awaitable[object]], reps: int) -> float:
    """Median wall time of ``fn`` in ms."""
    lat = []
    for _ in range(reps):
        t = time.perf_counter()
        await fn()
        lat.append((time.perf_counter() - t) * 1000)
    return median(lat)


async def main() -> None:
    """Fill, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mongo-url", default="mongodb://127.0.0.1:27017/")
    parser.add_argument("--ips", type=int, default=2, help="IPs with a week of history")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measure")
    parser.add_argument("--legacy", action="store_true", help="also time the former layout")
    args = parser.parse_args()
    client = mongo_client(args.mongo_url, app_name="dockvm-bench", timeout_ms=120_000)
    db = client[f"bench_monitor_{uuid.uuid4().hex[:8]}"]
    ips = [f"10.77.0.{i + 1}" for i in range(args.ips)]
    ip = ips[0]
    store = MongoSampleStore(db)
    rows: list[tuple[str, float, float]] = []
    try:
        await store.setup()
        t = time.perf_counter()
        n = await _fill(store, ips)
        print(machine())
        print(f"filled {n} samples ({args.ips} IPs x 1 week at {INTERVAL_S}s) in "
              f"{time.perf_counter() - t:.0f}s")
        mid = START + timedelta(hours=WEEK_H // 2)
        peer = await _time(
            lambda: db[history_collection(ip, mid)].find_one({"_id": mid.isoformat()}),
            args.reps,
        )
        rows.append(("raw find_one _id", peer, 1.0))

        async def query(span: timedelta, step: str) -> None:
            docs = await store.samples(ip, END - span, END)
            downsample(docs, step)

        for label, span, step in (("query 1h 1m", timedelta(hours=1), "1m"),
                                  ("query 1w 10m", timedelta(days=7), "10m")):
            ms = await _time(lambda span=span, step=step: query(span, step), args.reps)
            rows.append((label, ms, ms / peer))

        rnd = iter(range(10**6))

        def round_docs() -> list[dict]:
            at = END + timedelta(seconds=INTERVAL_S * next(rnd))
            return [_sample(i, at, 1) for i in ips]

        write = await _time(lambda: store.add_samples(round_docs()), args.reps)
        flat = await _time(
            lambda: db["flat_peer"].insert_many(round_docs(), ordered=False), args.reps
        )
        rows.append(("insert_many round", flat, 1.0))
        rows.append(("add_samples round", write, write / flat))

        if args.legacy:
            legacy = db["legacy_samples"]
            await legacy.create_indexes([IndexModel([("ip", ASCENDING), ("t", ASCENDING)])])
            docs = [_sample(ip, START + timedelta(seconds=INTERVAL_S * k), k)
                    for k in range(WEEK_H * 3600 // INTERVAL_S)]
            for i in range(0, len(docs), 2000):
                await legacy.insert_many(docs[i:i + 2000], ordered=False)
            for label, span, step in (("legacy 1h 1m", timedelta(hours=1), "1m"),
                                      ("legacy 1w 10m", timedelta(days=7), "10m")):
                async def old(span=span, step=step) -> None:
                    cur = legacy.find({"ip": ip, "t": {"$gte": END - span, "$lt": END}})
                    downsample(await cur.sort("t", ASCENDING).to_list(), step)
                ms = await _time(old, 1)
                rows.append((label, ms, ms / peer))
    finally:
        await client.drop_database(db.name)
        await client.close()
    print(f"{'what':<20} {'median ms':>10} {'ratio':>8}")
    for label, ms, ratio in rows:
        print(f"{label:<20} {ms:>10.1f} {ratio:>8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
