"""A private Prometheus (and Alertmanager) for a test: Debian's binaries, the repo's templates.

The config is rendered from ``deploy/prometheus/*.yml.in`` the way scripts/stack.sh renders it,
with the test's own ports, data directory, gateway and credential, so a test can restart or
scrape its own Prometheus without touching the stack's on 9090.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.stack import free_port

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "deploy" / "prometheus"


def render(template: str, **values: str) -> str:
    """``TEMPLATE`` with its ``@NAME@`` placeholders replaced (all must be given)."""
    text = (TEMPLATES / template).read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", value)
    text = text.replace("@GATEWAY_AUTH@", "authorization")
    left = re.findall(r"@[A-Z_]+@", text.split("\n", 3)[-1])
    assert not left, f"unrendered placeholders in {template}: {left}"
    return text


async def wait_for(
    check: Callable[[], Awaitable[Any]], timeout: float, what: str, every: float = 0.5
) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = await check()
        if got:
            return got
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


@dataclass
class PrometheusProcess:
    """One Prometheus on a free loopback port, data under ``workdir`` (kept across restarts)."""

    workdir: Path
    gateway_url: str
    secret: str
    alertmanager: str = "127.0.0.1:1"
    scrape_interval: str = "2s"
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """Base URL of its HTTP API."""
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        """Render the config and the credential file (0600) into ``workdir``."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        secret = self.workdir / "gateway.secret"
        secret.write_text(self.secret)
        secret.chmod(0o600)
        conf = self.workdir / "prometheus.yml"
        conf.write_text(
            render(
                "prometheus.yml.in",
                SCRAPE_INTERVAL=self.scrape_interval,
                SD_REFRESH="2s",
                INSTANCE=f"test-{self.port}",
                RULES_DIR=str(TEMPLATES / "rules"),
                ALERTMANAGER=self.alertmanager,
                GATEWAY_URL=self.gateway_url,
                SECRET_FILE=str(secret),
            )
        )
        return conf

    async def start(self) -> PrometheusProcess:
        """Start it and wait until ``/-/ready`` answers."""
        conf = self.write_config()
        log = open(self.workdir / "prometheus.log", "ab")
        self.proc = await asyncio.create_subprocess_exec(
            "prometheus",
            f"--config.file={conf}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            "--storage.tsdb.retention.time=8d",
            f"--web.listen-address=127.0.0.1:{self.port}",
            stdout=log,
            stderr=log,
        )
        log.close()
        await wait_for(self._ready, 60, "prometheus /-/ready")
        return self

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            tail = (self.workdir / "prometheus.log").read_text()[-2000:]
            raise AssertionError(f"prometheus exited: {tail}")
        try:
            async with aiohttp.ClientSession() as s, s.get(f"{self.url}/-/ready") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    async def stop(self) -> None:
        """SIGTERM (Prometheus writes its head to disk), then wait."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.proc = None

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        async with aiohttp.ClientSession() as s, s.get(
            f"{self.url}/api/v1/query", params={"query": promql}
        ) as r:
            body = await r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]


@dataclass
class AlertmanagerProcess:
    """One Alertmanager on a free loopback port, its receiver the test's gateway."""

    workdir: Path
    webhook_url: str
    secret_file: Path
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def addr(self) -> str:
        """host:port, as Prometheus's config names it."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> AlertmanagerProcess:
        """Start it and wait until ``/-/ready`` answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "alertmanager.yml"
        conf.write_text(
            render(
                "alertmanager.yml.in",
                WEBHOOK_URL=self.webhook_url,
                SECRET_FILE=str(self.secret_file),
            )
        )
        log = open(self.workdir / "alertmanager.log", "ab")
        self.proc = await asyncio.create_subprocess_exec(
            "prometheus-alertmanager",
            f"--config.file={conf}",
            f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address={self.addr}",
            "--cluster.listen-address=",
            stdout=log,
            stderr=log,
        )
        log.close()

        async def ready() -> bool:
            try:
                async with aiohttp.ClientSession() as s, s.get(f"http://{self.addr}/-/ready") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, 60, "alertmanager /-/ready")
        return self

    async def stop(self) -> None:
        """SIGTERM, then wait."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()
        self.proc = None
