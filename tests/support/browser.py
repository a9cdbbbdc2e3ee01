"""Debian's Chromium driven by Playwright for the console's browser tests: headless, never
Playwright's own browser download (it cannot work here), and a console login helper."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from playwright.async_api import Browser, Page, async_playwright

CHROMIUM = os.environ.get("DOCKVM_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
# The page's controls that have no label, no text and no aria-label (a screen reader would
# announce them by their type alone).
UNLABELLED = """() => [...document.querySelectorAll('input:not([type=hidden]), select, button')]
  .filter(el => !(el.labels && el.labels.length) && !el.textContent.trim()
                && !el.getAttribute('aria-label')).map(el => el.outerHTML)"""


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium, closed at the end."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            yield browser
        finally:
            await browser.close()


async def login(browser: Browser, base: str, token: str, width: int = 1280) -> Page:
    """A new page of a new context, logged in to the console with ``token``."""
    context = await browser.new_context(viewport={"width": width, "height": 900})
    page = await context.new_page()
    await page.goto(f"{base}/ui/login")
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{base}/ui/machines")
    return page


async def screenshot(page: Page, name: str) -> None:
    """Save the page (full length) as docs/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
