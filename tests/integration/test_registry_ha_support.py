"""Support for the registry HA tests: a dc in its production shape, made for one test on the
stack's real Ceph (scripts/ceph.sh): a bucket of its own, two ``docker-registry`` replicas with
the s3 driver on the RADOS Gateway, one HAProxy in front, both configured from the templates
scripts/registry.sh uses (deploy/registry/). The stack's own dc1/dc2 are not touched.

No tests here; the fixtures are imported by the test modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import aiohttp
import pytest

from services.imagesync.adapters.registry import HttpRegistry
from services.imagesync.settings import RegistryEndpoint
from tests.integration.test_imagesync_support import REGISTRY_BIN, SECRET
from tests.support.stack import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
CEPH_SH = REPO_ROOT / "scripts" / "ceph.sh"
STATE = Path(os.environ.get("DOCKVM_STATE_DIR", "/var/lib/dockvm"))
S3_ENV = STATE / "ceph" / "s3.env"
RGW_PORT = int(os.environ.get("DOCKVM_CEPH_RGW_PORT", "7480"))
BUCKET_PREFIX = os.environ.get("DOCKVM_S3_BUCKET_PREFIX", "dockvm-registry-")
TEMPLATES = REPO_ROOT / "deploy" / "registry"


def render(*templates: str, **values: str) -> str:
    """deploy/registry/ templates one after another, filled in as scripts/registry.sh does."""
    text = "".join((TEMPLATES / name).read_text() for name in templates)
    return Template(text).substitute(values)


def s3_keys() -> tuple[str, str]:
    """The registries' S3 access and secret key (made by ceph.sh up)."""
    env = dict(line.split("=", 1) for line in S3_ENV.read_text().splitlines() if "=" in line)
    return env["DOCKVM_S3_ACCESS_KEY"], env["DOCKVM_S3_SECRET_KEY"]


def ceph_sh(*args: str, timeout: float = 120) -> str:
    """Run scripts/ceph.sh; its output (raises on failure)."""
    return subprocess.run(
        [str(CEPH_SH), *args], check=True, capture_output=True, text=True, timeout=timeout
    ).stdout


def _registry_env() -> dict[str, str]:
    # Distribution's AWS SDK panics at start when AWS_CA_BUNDLE is set (see registry.sh).
    return {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"} | {
        "OTEL_TRACES_EXPORTER": "none"
    }


@dataclass
class Replica:
    """One ``docker-registry`` of the pair, on the dc's bucket."""

    dc: str
    name: str
    bucket: str
    http_secret: str
    notify_url: str
    root: Path
    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """Its own address (not the balancer's)."""
        return f"http://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        access, secret = s3_keys()
        cfg = self.root / f"{self.dc}-{self.name}.yml"
        # Quicker notification retries than the stack's: a test waits on them.
        text = render(
            "replica.yml.in", "notifications.yml.in",
            DC=self.dc, REPLICA=self.name, LOG_LEVEL="warn", S3_ACCESS_KEY=access,
            S3_SECRET_KEY=secret, S3_ENDPOINT=f"http://127.0.0.1:{RGW_PORT}", S3_SECURE="false",
            BUCKET=self.bucket, ADDR=f"127.0.0.1:{self.port}", HTTP_SECRET=self.http_secret,
            NOTIFY_URL=self.notify_url, WEBHOOK_SECRET=SECRET, NOTIFY_THRESHOLD="3",
            NOTIFY_BACKOFF="300ms",
        )  # fmt: skip
        cfg.touch(mode=0o600)
        cfg.write_text(text)
        cfg.chmod(0o600)
        return cfg

    async def start(self) -> None:
        """Start it and wait until its ``/v2/`` answers."""
        with open(self.root / f"{self.dc}-{self.name}.log", "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                REGISTRY_BIN,
                "serve",
                str(self._config()),
                stdout=log,
                stderr=log,
                env=_registry_env(),
            )
        await wait_http(f"{self.url}/v2/", 200, 20)

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM then SIGKILL; no-op when not running."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def wait_http(url: str, status: int, timeout: float) -> None:
    """Poll ``url`` until it answers ``status``."""
    async with aiohttp.ClientSession() as s, asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(url) as r:
                    if r.status == status:
                        return
            await asyncio.sleep(0.05)


@dataclass
class HaDc:
    """A dc: its bucket, its replicas and the HAProxy in front of them."""

    dc: str
    root: Path
    notify_url: str
    replicas: list[Replica] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    bucket_suffix: str = field(default_factory=lambda: f"t-{secrets.token_hex(5)}")
    haproxy: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """The balanced address."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """host:port of the balanced address, as in image references."""
        return f"127.0.0.1:{self.port}"

    @property
    def sock(self) -> Path:
        """HAProxy's stats socket."""
        return self.root / f"haproxy-{self.dc}.sock"

    def endpoint(self) -> RegistryEndpoint:
        """The balanced address as imagesync's topology names it."""
        return RegistryEndpoint(self.dc, self.url)

    def _haproxy_config(self) -> Path:
        servers = "\n".join(f"  server {r.name} 127.0.0.1:{r.port} check" for r in self.replicas)
        cfg = self.root / f"haproxy-{self.dc}.cfg"
        cfg.write_text(
            render("haproxy.cfg.in", "haproxy-dc.cfg.in", STATS_SOCKET=str(self.sock), DC=self.dc,
                   BIND=f"127.0.0.1:{self.port}")
            + servers + "\n"
        )  # fmt: skip
        return cfg

    async def start_haproxy(self) -> None:
        """Start HAProxy and wait until the balanced ``/v2/`` answers."""
        with open(self.root / f"haproxy-{self.dc}.log", "ab") as log:
            self.haproxy = await asyncio.create_subprocess_exec(
                "haproxy", "-db", "-f", str(self._haproxy_config()), stdout=log, stderr=log
            )
        await wait_http(f"{self.url}/v2/", 200, 20)
        await self.wait_state({r.name: "UP" for r in self.replicas}, 20)

    async def stop_haproxy(self) -> None:
        """Stop HAProxy."""
        if self.haproxy is not None and self.haproxy.returncode is None:
            self.haproxy.terminate()
            await self.haproxy.wait()

    def stats(self) -> dict[str, dict[str, str]]:
        """HAProxy's ``show stat`` of the backend's servers: name → {status, scur, ...}."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        lines = data.decode().splitlines()
        head = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(head, line.split(","), strict=False)) for line in lines[1:] if line]
        return {r["svname"]: r for r in rows if r["svname"] not in ("FRONTEND", "BACKEND")}

    async def wait_state(self, want: dict[str, str], timeout: float) -> None:
        """Wait until HAProxy reports each named server in the given status (UP, DOWN)."""
        async with asyncio.timeout(timeout):
            while True:
                stats = self.stats()
                if all(stats[n]["status"] == s for n, s in want.items()):
                    return
                await asyncio.sleep(0.05)

    def replica(self, name: str) -> Replica:
        """A replica by name (r1, r2)."""
        return next(r for r in self.replicas if r.name == name)


@pytest.fixture
async def ha_dc_factory(tmp_path: Path) -> AsyncIterator[Callable[..., HaDc]]:
    """Make HA dcs for one test (bucket, two replicas, HAProxy); all removed after it."""
    if os.environ.get("DOCKVM_REGISTRY_STORAGE", "ceph") == "filesystem":
        pytest.skip("the light mode runs no Ceph (DOCKVM_REGISTRY_STORAGE=filesystem)")
    made: list[HaDc] = []

    async def make(dc: str, notify_url: str) -> HaDc:
        root = tmp_path / "ha"
        root.mkdir(exist_ok=True)
        d = HaDc(dc, root, notify_url)
        made.append(d)
        await asyncio.to_thread(ceph_sh, "bucket", d.bucket_suffix)
        http_secret = secrets.token_hex(16)
        d.replicas = [
            Replica(dc, f"r{i}", BUCKET_PREFIX + d.bucket_suffix, http_secret, notify_url, root)
            for i in (1, 2)
        ]
        for r in d.replicas:
            await r.start()
        await d.start_haproxy()
        return d

    yield make  # type: ignore[misc]
    for d in made:
        await d.stop_haproxy()
        for r in d.replicas:
            await r.stop()
        await asyncio.to_thread(ceph_sh, "rmbucket", d.bucket_suffix)


def registry_client(url: str, dc: str, session: aiohttp.ClientSession) -> HttpRegistry:
    """A Registry API client for ``url`` (a balancer or one replica)."""
    return HttpRegistry(RegistryEndpoint(dc, url), session)
