"""Benchmark: the console's machine page with a one-week plot, ready in Chromium, against the
same data fetched from the ``/v1`` API alone, in one run.

The setup is bench/monitor_history.py's: a week of 10 s samples of one IP written into a fresh
Prometheus with ``promtool``, Debian's Prometheus on it (compacted), ipam and the gateway as
subprocesses on a fresh vhost and database. One machine document holding that IP is written
into the gateway's database (stopped, on no host: nothing acts on it). Then, alternately:

- ``browser``: Debian's Chromium (headless, Playwright) loads ``/ui/machines/{id}?range=1w``,
  logged in as admin, until the four uPlot charts are drawn (``#plots[data-ready]``): the
  gateway renders the page from four ``/v1`` calls over loopback, the browser parses it, loads
  the (cached) scripts and draws ~1,000 points per series;
- ``api``: the same four ``/v1`` calls the page is made from (the machine, then its IP's owners,
  its one-week metrics and the hosts at once), with a bearer token, JSON parsed;
- and, for the breakdown, ``html``: the page's HTML alone, fetched without a browser (the
  server's part: the same calls, and the template).

Usage: ``.venv/bin/python -m bench.console [--reps N]``
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from pymongo import AsyncMongoClient

from bench._common import median, percentile
from bench.monitor_history import IP, week_stack
from services.gateway.console.session import COOKIE, new_session
from tests.support.browser import chromium, login
from tests.support.stack import MONGO_URL

MID = "m-bench"


def _machine_doc() -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"_id": MID, "type": "docker", "app": "bench", "state": "stopped", "reason": None,
            "image": "dockvm/base:bookworm", "cpus": 1.0, "memory": 512 << 20, "disk": 1 << 30,
            "dc": "dc1", "vlan_id": 1, "hostname": "bench-1", "ip": IP, "host": None,
            "created_at": now - timedelta(days=8), "updated_at": now, "pending": None}  # fmt: skip


async def _api_alone(api: aiohttp.ClientSession) -> int:
    """The page's four calls; the number of points read."""
    async with api.get(f"/v1/machines/{MID}") as r:
        assert r.status == 200, await r.text()
        await r.json()
    now = datetime.now(UTC)
    week = {"from": (now - timedelta(days=7)).isoformat(), "to": now.isoformat(), "step": "10m"}

    async def get(path: str, params: dict[str, str] | None = None) -> Any:
        async with api.get(path, params=params) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    _, metrics, _ = await asyncio.gather(
        get(f"/v1/ips/{IP}"), get(f"/v1/ips/{IP}/metrics", week), get("/v1/hosts")
    )
    return len(metrics["points"])


async def _measure(base: str, token: str, reps: int) -> dict[str, Any]:
    """Browser and API alone, alternately, after two warm-up rounds of each."""
    browser_ms, api_ms, html_ms, drawn, read = [], [], [], 0, 0
    cookie = {"Cookie": f"{COOKIE}={new_session(token).cookie}"}
    async with chromium() as browser, aiohttp.ClientSession(
        base, headers={"Authorization": f"Bearer {token}"}
    ) as api, aiohttp.ClientSession(base, headers=cookie) as plain:
        page = await login(browser, base, token)

        async def html_only() -> None:
            async with plain.get(f"/ui/machines/{MID}", params={"range": "1w"}) as r:
                assert r.status == 200, r.status
                await r.read()

        async def in_browser() -> int:
            await page.goto(f"{base}/ui/machines/{MID}?range=1w")
            await page.wait_for_selector("#plots[data-ready=true]", timeout=60_000)
            return await page.evaluate("window.consolePlots.cpu.data[0].length")

        for k in range(reps + 2):
            t = time.perf_counter()
            drawn = await in_browser()
            b = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            read = await _api_alone(api)
            a = (time.perf_counter() - t) * 1000
            t = time.perf_counter()
            await html_only()
            h = (time.perf_counter() - t) * 1000
            if k >= 2:
                browser_ms.append(b)
                api_ms.append(a)
                html_ms.append(h)
    return {"browser": browser_ms, "api": api_ms, "html": html_ms, "drawn": drawn, "read": read}


async def main() -> None:
    """Fill, start, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20, help="repetitions of each")
    args = parser.parse_args()
    async with week_stack("console") as st:
        mongo: AsyncMongoClient = AsyncMongoClient(MONGO_URL)
        try:
            await mongo[st.db]["machines"].insert_one({**_machine_doc(), "transitions": []})
            await mongo[st.db]["machine_summaries"].insert_one(_machine_doc())
        finally:
            await mongo.close()
        results = await _measure(st.gateway_url, st.token, args.reps)
    b, a = results["browser"], results["api"]
    print(f"{'machine page, 1 week':<22} {'p50':>9} {'p99':>9}   points")
    print(f"{'Chromium, plot drawn':<22} {median(b):>7.0f}ms {percentile(b, 99):>7.0f}ms "
          f"  {results['drawn']} per series")
    print(f"{'/v1 API alone':<22} {median(a):>7.0f}ms {percentile(a, 99):>7.0f}ms "
          f"  {results['read']} read")
    h = results["html"]
    print(f"{'page HTML alone':<22} {median(h):>7.0f}ms {percentile(h, 99):>7.0f}ms "
          "  (the server's part: the same calls, rendered)")
    print(f"ratio (browser / API alone, p50): {median(b) / median(a):.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
