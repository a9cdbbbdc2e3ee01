"""The console's machine pages in a real browser over the real stack: ipam, an agent, its
monitor, the gateway and a Prometheus of the test's own (the monitoring tests' fixture), one
machine. Its page plots the IP's metrics (the chart's data read from the page), a resize
through the page shows the new limit (and a shrink below its usage the API's warning), the
host is drained and undrained, the machine stopped, started, restarted and deleted (its
confirmation dismissed, then accepted) from its page, and the main pages
are saved as screenshots for the README (docs/screenshots/).
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_prometheus_monitoring import Mon, mon  # noqa: F401 (fixture)
from tests.support.browser import UNLABELLED, chromium, login, screenshot
from tests.support.prometheus import wait_for

pytestmark = pytest.mark.integration

# What the page's charts hold: x values, and the non-null values of each CPU and memory series.
CHART_DATA = """() => {
  const p = window.consolePlots;
  const n = (a) => a.filter((v) => v !== null && v !== undefined).length;
  return {t: p.cpu.data[0].length, cpu: n(p.cpu.data[1]), mem: n(p.mem.data[1]),
          limit: p.mem.data[2].filter((v) => v !== null).slice(-1)[0],
          owners: JSON.parse(document.getElementById('plot-data').textContent).owners
                    .map((o) => o.machine_id)};
}"""


def _since(minutes: float) -> str:
    return (datetime.now(UTC) - timedelta(minutes=minutes)).isoformat()


async def _machine(mon: Mon, mid: str) -> dict[str, Any]:  # noqa: F811
    async with mon.api.get(f"/v1/machines/{mid}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _until(mon: Mon, mid: str, ok: Any, timeout: float = 60) -> dict[str, Any]:  # noqa: F811
    """The machine once ``ok(machine)`` holds (polled; fails after ``timeout`` s)."""
    async with asyncio.timeout(timeout):
        while not ok(doc := await _machine(mon, mid)):
            await asyncio.sleep(0.3)
    return doc


async def _plot(page: Any) -> dict[str, Any]:
    await page.wait_for_selector("#plots[data-ready=true]", timeout=30_000)
    return await page.evaluate(CHART_DATA)


async def test_a_machine_page_plots_its_ip_and_a_resize_shows_the_new_limit(
    mon: Mon,  # noqa: F811 (the imported fixture)
    service_env: dict[str, str],
):
    m = await mon.create(cpus=0.5, memory="256m")

    async def points() -> bool:
        body = await mon.metrics(m["ip"], step="10s", **{"from": _since(10)})
        return len([p for p in body["points"] if p["mem_working_set"]]) >= 3

    await wait_for(points, 120, "three 10 s points of the machine in the API")
    base = mon.prom.gateway_url
    token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
    async with chromium() as browser:
        page = await login(browser, base, token)
        await page.locator("a.rowlink").first.wait_for()
        await screenshot(page, "machines")
        await page.locator("a.rowlink").first.click()
        hour = await _plot(page)
        unlabelled = await page.evaluate(UNLABELLED)
        await screenshot(page, "machine")
        await page.get_by_label("Memory", exact=True).fill("384m")
        await page.get_by_role("button", name="Resize").click()
        await page.wait_for_url("**msg=resized")
        limit = await page.locator("#limit-memory").get_attribute("data-bytes")
        flash = await page.get_by_role("status").inner_text()
        # Below what the machine uses plus the agent's margin: the API's scale-down warning,
        # and the same resize offered again, forced (not clicked).
        await page.get_by_label("Memory", exact=True).fill("64m")
        async with page.expect_response(lambda r: r.request.method == "POST") as refused:
            await page.get_by_role("button", name="Resize").click()
        warning = (await refused.value).status, await page.get_by_role("alert").inner_text()
        forced = await page.get_by_role("button", name="Resize anyway").count()
        await screenshot(page, "resize-warning")
        await page.get_by_role("link", name="Back").click()
        await page.get_by_role("link", name="1w").click()
        week = await _plot(page)
        await screenshot(page, "machine-week")
        await page.goto(f"{base}/ui/hosts")
        await page.get_by_role("button", name="Drain").click()
        await page.wait_for_url("**msg=drain*")
        drained = await page.get_by_role("button", name="Undrain").count()
        await screenshot(page, "hosts")
        await page.get_by_role("button", name="Undrain").click()
        await page.wait_for_url("**msg=undrain*")
        undrained = await page.get_by_role("button", name="Undrain").count()
        # An action through the page; its state part is polled (htmx) while the stop runs.
        await page.goto(f"{base}/ui/machines/{m['id']}")
        await page.get_by_role("button", name="Stop").click()
        await page.wait_for_url("**msg=stop+requested")
        await page.locator("#state", has_text="stopped").wait_for(timeout=60_000)
        stopped = await page.locator("#live table tbody tr").first.inner_text()
        await page.get_by_role("button", name="Start", exact=True).click()
        await page.wait_for_url("**msg=start+requested")
        await page.locator("#state", has_text="running").wait_for(timeout=60_000)
        before = len((await _machine(mon, m["id"]))["transitions"])
        await page.get_by_role("button", name="Restart").click()
        await page.wait_for_url("**msg=restart+requested")
        restarted = await _until(mon, m["id"], lambda d: len(d["transitions"]) > before)
        phone = await login(browser, base, token, width=390)
        await phone.goto(f"{base}/ui/machines/{m['id']}")
        await _plot(phone)
        await screenshot(phone, "machine-phone")
        overflow = await phone.evaluate("document.documentElement.scrollWidth")
        # Delete asks first: dismissed, nothing happens; accepted, the machine is destroyed.
        page.once("dialog", lambda d: d.dismiss())
        await page.get_by_role("button", name="Delete").click()
        kept = (await _machine(mon, m["id"]))["state"]
        page.once("dialog", lambda d: d.accept())
        await page.get_by_role("button", name="Delete").click()
        await page.wait_for_url("**msg=delete+requested")
        destroyed = await _until(mon, m["id"], lambda d: d["state"] == "destroyed")

    assert hour["t"] >= 3 and hour["cpu"] >= 3 and hour["mem"] >= 3, hour
    assert hour["limit"] == 256 << 20
    assert hour["owners"] == [m["id"]]
    assert unlabelled == []
    assert (limit, flash) == (str(384 << 20), "resized")
    assert warning[0] == 409 and "use force" in warning[1], warning
    assert forced == 1
    assert (drained, undrained) == (1, 0)
    assert "stopped" in stopped  # the newest transition, first
    assert restarted["transitions"][-1]["state"] == "running"  # the restart's own transition
    assert restarted["state"] == "running"
    assert (kept, destroyed["state"]) == ("running", "destroyed")
    assert week["t"] >= 1 and week["mem"] >= 1, week
    assert overflow <= 400, "the phone-sized page scrolls sideways"
    assert json.dumps(week["owners"]) == json.dumps([m["id"]])
