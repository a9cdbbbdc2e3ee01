"""Benchmark: ipam allocations against raw ``insert_one`` into the same database.

For concurrency 1, 16 and 64 it measures, in one run and on the same MongoDB API:

- ``raw``: ``insert_one`` of a lease-sized document (the least an allocation must write);
- ``alloc 10%`` / ``alloc 95%``: ``Ipam.allocate`` of fresh machines in a /16 pool that is
  10% or 95% full (filled directly in the store, the same state the allocator would leave).

It prints allocations/s, p50 and p99 latency, and the ratio to the raw insert rate. The
allocation path is measured in-process (the store and use case ipam runs), not through the
bus: the bus adds the same cost to any handler.

Usage: ``.venv/bin/python bench/ipam.py [--mongo-url URL] [--ops N]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address

from libs.common.clock import utcnow
from libs.common.db import mongo_client
from services.ipam.domain import block_offsets
from services.ipam.service import Ipam
from services.ipam.store import BLOCKS, LEASES, MongoIpamStore

BLOCK = 128  # the default of DOCKVM_IPAM_BLOCK_SIZE; --block overrides it


async def _measure(fn: Callable[[int], Awaitable[object]], ops: int, conc: int) -> dict:
    """Run ``fn(i)`` for ``ops`` values of i with ``conc`` workers; rate and latencies."""
    lat: list[float] = []
    counter = iter(range(ops))

    async def worker() -> None:
        for i in counter:
            t = time.perf_counter()
            await fn(i)
            lat.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(conc)])
    elapsed = time.perf_counter() - start
    lat.sort()
    return {
        "rate": ops / elapsed,
        "p50": statistics.median(lat) * 1000,
        "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
    }


async def _fill(db, ipam: Ipam, name: str, fraction: float, block: int) -> None:
    """Make ``fraction`` of the pool's addresses leased, as block-wise allocation would."""
    pool = await ipam.pools.active(name)
    target = int(pool.usable_count() * fraction)
    leases, blocks, k, now = [], [], 0, utcnow()
    while len(leases) < target:
        for o in block_offsets(pool, k, block):
            ip = str(IPv4Address(pool.first + o))
            leases.append(
                {
                    "_id": f"fill-{name}-{o}",
                    "active_ip": ip,
                    "ip": ip,
                    "gen": 1,
                    "pool": name,
                    "pool_uid": pool.uid,
                    "dc": pool.dc,
                    "vlan_id": pool.vlan_id,
                    "prefix_len": pool.network.prefixlen,
                    "gateway": str(pool.gateway),
                    "allocated_at": now,
                    "request_id": None,
                    "state": "active",
                }
            )
        blocks.append(
            {
                "_id": f"{pool.uid}:{k}",
                "pool_uid": pool.uid,
                "k": k,
                "owner": "bench",
                "at": now,
                "full": True,
            }
        )
        k += 1
    for i in range(0, len(leases), 2000):
        await db[LEASES].insert_many(leases[i : i + 2000])
    await db[BLOCKS].insert_many(blocks)
    await db["pools"].update_one({"_id": name}, {"$set": {"block_hint": k - 1}})


async def main() -> None:
    """Run every configuration and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mongo-url", default="mongodb://127.0.0.1:27017/")
    parser.add_argument("--ops", type=int, default=400, help="operations per configuration")
    parser.add_argument("--prefix", type=int, default=16, help="pool size (a /16 by default)")
    parser.add_argument("--block", type=int, default=BLOCK, help="ipam block size")
    args = parser.parse_args()

    client = mongo_client(args.mongo_url, app_name="dockvm-bench-ipam")
    db = client[f"bench_ipam_{uuid.uuid4().hex[:8]}"]
    try:
        store = MongoIpamStore(db)
        await store.setup()
        ipam = Ipam(store, block_size=args.block)
        for name, vlan, fraction in (("p10", 210, 0.10), ("p95", 220, 0.95)):
            net = f"10.{vlan}.0.0/{args.prefix}"
            await ipam.create_pool(
                name, "dc1", vlan, net, IPv4Address(f"10.{vlan}.0.1"), [], 7 * 24 * 3600
            )
            await _fill(db, ipam, name, fraction, args.block)
        print(f"leases in store after fill: {await db[LEASES].count_documents({})}")

        rows = []
        for conc in (1, 16, 64):
            run = uuid.uuid4().hex[:6]
            raw = await _measure(
                lambda i, run=run: db["bench_raw"].insert_one(
                    {
                        "_id": f"raw-{run}-{i}",
                        "active_ip": f"{run}-{i}",
                        "ip": "10.0.0.1",
                        "gen": 1,
                        "pool": "p",
                        "machine": f"m-{run}-{i}",
                        "at": utcnow(),
                    }
                ),
                args.ops,
                conc,
            )
            rows.append(("raw insert_one", conc, raw, raw["rate"]))
            for name, label in (("p10", "alloc 10% full"), ("p95", "alloc 95% full")):
                res = await _measure(
                    lambda i, name=name, run=run: ipam.allocate(f"{name}-{run}-{i}", pool=name),
                    args.ops,
                    conc,
                )
                rows.append((label, conc, res, raw["rate"]))

        print(f"{'what':<16} {'conc':>4} {'ops/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'vs raw':>7}")
        for label, conc, res, base in rows:
            print(
                f"{label:<16} {conc:>4} {res['rate']:>9.0f} {res['p50']:>8.2f} "
                f"{res['p99']:>8.2f} {res['rate'] / base:>7.0%}"
            )
    finally:
        await client.drop_database(db.name)
        await client.close()


if __name__ == "__main__":
    asyncio.run(main())
