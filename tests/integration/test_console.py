"""The web console in a real browser against a real gateway (no other service): login into
an HttpOnly SameSite=Strict cookie, a viewer's pages without action buttons, and POSTs the
console refuses (no CSRF token) or the API refuses (the viewer's role).

The machines, plots and replay are in test_console_machines.py and test_console_sessions.py.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from libs.common.clock import utcnow
from tests.support.browser import UNLABELLED, chromium, login, screenshot

pytestmark = pytest.mark.integration


@pytest.fixture
async def gateway(start_service: Any, service_env: dict[str, str]) -> tuple[str, str]:
    """A gateway of the test's own and its admin token."""
    gw = await start_service("gateway")
    token = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
    return gw.url, token


async def _token(base: str, admin: str, role: str) -> str:
    async with aiohttp.ClientSession(base, headers={"Authorization": f"Bearer {admin}"}) as s:
        async with s.post("/v1/tokens", json={"name": f"{role}-1", "role": role}) as r:
            assert r.status == 201, await r.text()
            return (await r.json())["token"]


async def test_a_bad_token_stays_on_the_login_page_and_a_good_one_gets_a_strict_cookie(
    gateway: tuple[str, str],
):
    base, admin = gateway
    async with chromium() as browser:
        context = await browser.new_context()
        page = await context.new_page()
        await page.goto(f"{base}/ui/machines")
        redirected = page.url
        await page.get_by_label("API token").fill("dvm_not-a-token")
        await page.get_by_role("button", name="Log in").click()
        error = await page.get_by_role("alert").inner_text()
        good = await login(browser, base, admin)
        cookies = {c["name"]: c for c in await good.context.cookies()}
        visible_to_script = await good.evaluate("document.cookie")
        headers = (await good.request.get(f"{base}/ui/machines")).headers

    assert redirected.startswith(f"{base}/ui/login?next=")
    assert "not valid" in error
    session = cookies["dvm_console"]
    assert (session["httpOnly"], session["sameSite"], session["path"]) == (True, "Strict", "/ui")
    assert admin in session["value"]
    assert "dvm_console" not in visible_to_script
    assert (headers["x-frame-options"], headers["cache-control"]) == ("DENY", "no-store")
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


async def test_a_viewer_sees_no_action_button_and_its_forged_post_is_refused_by_the_api(
    gateway: tuple[str, str],
):
    base, admin = gateway
    viewer = await _token(base, admin, "viewer")
    async with chromium() as browser:
        page = await login(browser, base, viewer)
        hosts = await page.goto(f"{base}/ui/hosts")
        assert hosts is not None and hosts.ok
        buttons = await page.locator("main button, main form[method=post]").count()
        csrf = await page.locator("header input[name=csrf]").input_value()
        # The viewer's own session and CSRF token: only the API's role check stands in the way.
        forged = await page.request.post(
            f"{base}/ui/machines/m-anything/action", form={"csrf": csrf, "action": "stop"}
        )
        forged_text = await forged.text()
        no_csrf = await page.request.post(
            f"{base}/ui/machines/m-anything/action", form={"action": "stop"}
        )
        drain = await page.request.post(f"{base}/ui/hosts/h1/drain", form={"csrf": csrf})
        nav = await page.get_by_role("navigation", name="Sections").inner_text()

    assert buttons == 0
    assert forged.status == 403 and "role viewer may not" in forged_text
    assert no_csrf.status == 403
    assert drain.status == 403
    assert re.findall(r"\w+", nav) == [
        "Machines", "Hosts", "Releases", "Images", "Sessions", "Audit"]  # fmt: skip


async def test_a_post_with_another_sessions_csrf_token_is_refused(gateway: tuple[str, str]):
    base, admin = gateway
    async with chromium() as browser:
        one = await login(browser, base, admin)
        two = await login(browser, base, admin)
        csrf_one = await one.locator("header input[name=csrf]").input_value()
        csrf_two = await two.locator("header input[name=csrf]").input_value()
        crossed = await two.request.post(f"{base}/ui/logout", form={"csrf": csrf_one})
        own = await two.request.post(f"{base}/ui/logout", form={"csrf": csrf_two},
                                     max_redirects=0)  # fmt: skip

    assert csrf_one != csrf_two
    assert crossed.status == 403
    assert own.status == 303 and own.headers["location"] == "/ui/login"


def _machine(mid: str, app: str, state: str, n: int) -> dict[str, Any]:
    now = utcnow()
    return {"_id": mid, "type": "docker", "app": app, "state": state, "reason": None,
            "image": "dockvm/base:bookworm", "cpus": 0.5, "memory": 256 << 20, "disk": 1 << 30,
            "dc": "dc1", "vlan_id": 1, "hostname": f"{app}-{n}", "ip": f"10.0.0.{n}",
            "host": None, "created_at": now, "updated_at": now, "pending": None,
            "transitions": [{"state": state, "at": now}]}  # fmt: skip


async def test_the_list_filters_pages_and_is_walked_with_the_keyboard(
    gateway: tuple[str, str], mongo_db: Any
):
    base, admin = gateway
    # Machines described as the gateway stores them (stopped, on no host: nothing acts on them).
    docs = [_machine(f"m-cons{n}", "shop" if n < 4 else "blog", "stopped", n) for n in (1, 2, 3, 4)]
    await mongo_db["machines"].insert_many(docs)
    await mongo_db["machine_summaries"].insert_many(
        [{k: v for k, v in d.items() if k != "transitions"} for d in docs]
    )
    async with chromium() as browser:
        page = await login(browser, base, admin)
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        await page.goto(f"{base}/ui/machines?app=blog")
        await page.get_by_role("link", name="blog-4").wait_for(timeout=15_000)
        # A machine that appears while the page is open shows without a reload (htmx polling).
        late = _machine("m-cons5", "blog", "stopped", 5)
        await mongo_db["machines"].insert_one(late)
        await mongo_db["machine_summaries"].insert_one(
            {k: v for k, v in late.items() if k != "transitions"}
        )
        await page.get_by_role("link", name="blog-5").wait_for(timeout=20_000)
        await page.goto(f"{base}/ui/machines?app=shop&limit=2")
        rows = page.locator("table[data-keynav] a.rowlink")
        await rows.nth(1).wait_for(timeout=15_000)  # the gateway's index reloads every 2 s
        first_page = await rows.all_inner_texts()
        await page.get_by_role("link", name="Next page").click()
        second_page = await page.locator("table[data-keynav] a.rowlink").all_inner_texts()
        unlabelled = await page.evaluate(UNLABELLED)
        await page.goto(f"{base}/ui/machines?app=shop")
        await page.locator("table[data-keynav] a.rowlink").nth(2).wait_for()
        focused = []
        for _ in range(30):  # Tab from the top of the page to the list's first row
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.classList.contains('rowlink')"):
                break
        focused.append(await page.evaluate("document.activeElement.textContent"))
        await page.keyboard.press("ArrowDown")
        focused.append(await page.evaluate("document.activeElement.textContent"))
        await page.keyboard.press("Enter")
        await page.wait_for_url(re.compile(r".*/ui/machines/m-cons2$"))
        state = await page.locator("#state").inner_text()

    assert errors == []
    assert first_page == ["shop-1", "shop-2"]
    assert second_page == ["shop-3"]
    assert unlabelled == []
    assert focused == ["shop-1", "shop-2"]
    assert state == "stopped"


def _release(rid: str, version: str, status: str, minutes_ago: int) -> dict[str, Any]:
    at = utcnow() - timedelta(minutes=minutes_ago)
    spec = {"app": "shop", "group_id": "com.example", "artifact_id": "shop", "version": version,
            "batch_size": 1, "health_check": {"type": "tcp", "target": "8080"}}
    return {"_id": rid, "app": "shop", "version": version, "spec": spec, "requested_by": "ci",
            "status": status, "reason": None, "batches": [{"machines": ["m-cons1"]}],
            "current_batch": 0, "failed_before": 0,
            "machines": {"m-cons1": {"status": status, "type": "docker", "host": None,
                                     "ip": None, "at": at, "version": version}},
            "created_at": at, "updated_at": at, "finished_at": at}  # fmt: skip


async def test_every_section_renders_for_an_admin_and_a_release_offers_its_rollback(
    start_service: Any, service_env: dict[str, str], mongo_db: Any
):
    # Nothing answers the builder's, imagesync's or the bastion's RPCs here: their pages say so.
    gw = await start_service("gateway", env={"DOCKVM_RPC_TIMEOUT_S": "1"})
    admin = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
    # Finished releases only: nothing sweeps or deploys them.
    await mongo_db["releases"].insert_many(
        [_release("rel-old", "1.0", "succeeded", 30), _release("rel-new", "2.0", "failed", 5)]
    )
    statuses = {}
    async with chromium() as browser:
        page = await login(browser, gw.url, admin)
        for section in ("hosts", "releases", "images", "audit", "sessions", "ips/10.0.0.9"):
            resp = await page.goto(f"{gw.url}/ui/{section}")
            statuses[section] = resp.status if resp else None
        await page.goto(f"{gw.url}/ui/releases")
        rollback = await page.get_by_role("button", name="Roll back to 1.0").count()
        await screenshot(page, "releases")
        page.once("dialog", lambda d: d.accept())  # "Deploy 1.0 of shop again?"
        async with page.expect_navigation():
            await page.get_by_role("button", name="Roll back to 1.0").click()
        refusal = await page.locator("main").inner_text()
        await page.goto(f"{gw.url}/ui/audit")
        audit_rows = await page.locator("table tbody tr").count()
        await screenshot(page, "audit")

    assert statuses == {"hosts": 200, "releases": 200, "images": 200, "audit": 200,
                        "sessions": 503, "ips/10.0.0.9": 200}  # fmt: skip
    assert rollback == 1
    # The rollback went to the API as a release of 1.0's spec (valid: no 422); the API, which
    # has no machine of the app here, refused it, and the page says what the API said.
    assert "Refused (404)" in refusal and "unknown app 'shop'" in refusal, refusal
    assert await mongo_db["releases"].count_documents({}) == 2
    assert audit_rows >= 1


async def test_the_images_page_shows_what_each_registry_holds_read_from_the_registry(
    start_service: Any, service_env: dict[str, str]
):
    gw = await start_service("gateway")
    await start_service("imagesync")
    admin = (Path(service_env["DOCKVM_STATE_DIR"]) / "admin.token").read_text().strip()
    # The stack pushes its base image to dc1 (`make run`, `make test`): read its digest from
    # the registry itself, through dc1's balancer.
    manifest = "application/vnd.docker.distribution.manifest.v2+json"
    async with aiohttp.ClientSession() as s:
        async with s.head(
            "http://127.0.0.1:5001/v2/dockvm/base/manifests/bookworm",
            headers={"Accept": f"{manifest}, application/vnd.oci.image.manifest.v1+json"},
        ) as r:
            assert r.status == 200
            digest = r.headers["Docker-Content-Digest"]
    async with chromium() as browser:
        page = await login(browser, gw.url, admin)
        await page.goto(f"{gw.url}/ui/images")
        await page.get_by_label("Repository prefix").fill("dockvm/base")
        await page.get_by_role("button", name="Filter").click()
        await page.wait_for_url(re.compile(r".*prefix=dockvm%2Fbase"))
        dc1 = page.locator("table.registry[data-dc=dc1] tbody tr", has_text="bookworm")
        row = await dc1.first.inner_text()
        title = await dc1.first.locator("code[title]").get_attribute("title")
        others = await page.locator("table.registry tbody tr", has_text="dockvm/demo").count()
        await screenshot(page, "images")

    assert "dockvm/base" in row
    assert title == digest
    assert others == 0  # the prefix filtered the rest out
