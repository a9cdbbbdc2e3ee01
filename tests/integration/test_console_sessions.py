"""The console's session pages in a real browser against a real bastion and a real machine
(the bastion tests' box and the gateway bastion tests' fixture): a recorded session replayed
in the page by asciinema-player shows what was typed, and an admin ends a live one with the
page's button.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncssh
import pytest

from tests.integration.test_bastion_support import (  # noqa: F401 (fixtures)
    ALICE,
    bastion_state_fixture,
    box_fixture,
)
from tests.integration.test_gateway_bastion import ALICE_KEY, Stack, stack  # noqa: F401
from tests.support.browser import chromium, login, screenshot
from tests.support.prometheus import wait_for

pytestmark = pytest.mark.integration


async def _sessions(stack: Stack, **params: str) -> list[dict[str, Any]]:  # noqa: F811
    async with stack.api.get("/v1/sessions", params={"user": "alice", **params}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["items"]


async def test_a_session_replays_in_the_page_and_an_admin_ends_a_live_one(
    stack: Stack,  # noqa: F811 (the imported fixture)
):
    async with stack.api.post("/v1/users", json={"name": "alice", "ssh_keys": [ALICE_KEY]}) as r:
        assert r.status == 201, await r.text()
    grant = {"user": "alice", "machine_id": stack.box.machine_id, "ttl_s": 600}
    async with stack.api.post("/v1/grants", json=grant) as r:
        assert r.status == 201, await r.text()
    await stack.ssh("echo console-replay-$((6*7))")
    (recorded,) = await _sessions(stack)
    token = stack.api.headers["Authorization"].removeprefix("Bearer ")
    async with asyncssh.connect(
        "127.0.0.1", stack.ssh_port, username="alice", client_keys=[ALICE],
        known_hosts=None, agent_path=None, connect_timeout=15,
    ) as conn:  # fmt: skip
        live_proc = await conn.create_process(f"root@{stack.box.ip} sleep 300")

        async def live() -> list[dict[str, Any]]:
            return [s for s in await _sessions(stack, live="true") if s["live"]]

        (held,) = await wait_for(live, 30, "the second session live")
        async with chromium() as browser:
            page = await login(browser, stack.url, token)
            await page.goto(f"{stack.url}/ui/sessions")
            await screenshot(page, "sessions")
            await page.get_by_role("link", name=recorded["id"]).click()
            player = page.locator("#player")
            await player.get_by_text("console-replay-42").first.wait_for(timeout=30_000)
            await screenshot(page, "session-replay")
            replayed = await player.inner_text()
            await page.goto(f"{stack.url}/ui/sessions/{held['id']}")
            page.on("dialog", lambda d: asyncio.ensure_future(d.accept()))
            await page.get_by_role("button", name="End session").click()
            await page.wait_for_url("**msg=end+requested")
        ended = await asyncio.wait_for(live_proc.wait_closed(), 30)

    async def gone() -> bool:
        return not await live()

    await wait_for(gone, 30, "the live session ended")
    assert "console-replay-42" in replayed
    assert "console-replay-$((6*7))" not in replayed  # the output, not the command line
    assert ended is None
