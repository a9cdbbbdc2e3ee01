"""Support for imagesync's integration tests: throwaway Distribution registries (the real
``docker-registry`` binary, storage under the test's tmp_path, notifications to the test's
imagesync) and real pushes of generated images through the Registry API.

No tests here; the fixtures are imported by the test modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from libs.common.errors import TransientError
from services.imagesync.adapters.registry import HttpRegistry, new_session
from services.imagesync.domain import Manifest
from services.imagesync.settings import RegistryEndpoint
from tests.support.stack import free_port

REGISTRY_BIN = "/usr/bin/docker-registry"
SECRET = "test-secret-" + "x" * 20
SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


@dataclass
class RegistryProcess:
    """One ``docker-registry serve`` on loopback, notifying ``notify_url``."""

    dc: str
    root: Path
    notify_url: str
    port: int = field(default_factory=free_port)
    auth_yaml: str = ""
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """host:port, as in image references."""
        return f"127.0.0.1:{self.port}"

    def _config(self) -> Path:
        cfg = self.root / f"{self.dc}.yml"
        cfg.write_text(
            f"""version: 0.1
log:
  level: warn
  formatter: text
storage:
  filesystem:
    rootdirectory: {self.root / self.dc}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{self.port}
{self.auth_yaml}
notifications:
  events:
    includereferences: true
  endpoints:
    - name: imagesync
      url: {self.notify_url}
      headers:
        Authorization: [Bearer {SECRET}]
        X-Dockvm-Dc: [{self.dc}]
      timeout: 2s
      threshold: 3
      backoff: 300ms
      ignoredmediatypes:
        - application/octet-stream
"""
        )
        return cfg

    async def start(self) -> RegistryProcess:
        """Start the registry and wait until ``/v2/`` answers."""
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{self.dc}.log", "ab")
        self.proc = await asyncio.create_subprocess_exec(
            REGISTRY_BIN,
            "serve",
            str(self._config()),
            stdout=log,
            stderr=log,
            env={**os.environ, "OTEL_TRACES_EXPORTER": "none"},
        )
        log.close()
        async with aiohttp.ClientSession() as s:
            async with asyncio.timeout(15):
                while True:
                    try:
                        async with s.get(f"{self.url}/v2/") as r:
                            if r.status in (200, 401):
                                return self
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop the registry (SIGTERM, then SIGKILL)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def registry_factory(tmp_path: Path) -> AsyncIterator[Callable[..., RegistryProcess]]:
    """Start registries for one test; all are stopped after it."""
    started: list[RegistryProcess] = []

    async def make(dc: str, notify_url: str, auth_yaml: str = "") -> RegistryProcess:
        reg = RegistryProcess(dc, tmp_path / "registries", notify_url, auth_yaml=auth_yaml)
        started.append(reg)
        return await reg.start()

    yield make  # type: ignore[misc]
    for reg in started:
        await reg.stop()


@pytest.fixture
async def http_session() -> AsyncIterator[aiohttp.ClientSession]:
    """The registry client's session."""
    # Not imagesync's user agent: the tests' pushes must look like anyone's.
    async with new_session(30, user_agent="dockvm-tests/1") as s:
        yield s


def client(
    reg: RegistryProcess, session: aiohttp.ClientSession, user: str = "", password: str = ""
) -> HttpRegistry:
    """A registry client for ``reg``."""
    return HttpRegistry(RegistryEndpoint(reg.dc, reg.url, user or None, password or None), session)


def random_layer(size: int) -> bytes:
    """Incompressible bytes standing in for a layer."""
    return secrets.token_bytes(size)


async def push_image(
    reg: HttpRegistry,
    repo: str,
    tag: str | None,
    layers: list[bytes],
    media_type: str = SCHEMA2,
    arch: str = "amd64",
) -> Manifest:
    """Push config, layers and manifest (under ``tag``, or by digest when None)."""
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "nonce": secrets.token_hex(8),
        }
    ).encode()
    config_type = (
        "application/vnd.docker.container.image.v1+json"
        if media_type == SCHEMA2
        else "application/vnd.oci.image.config.v1+json"
    )
    layer_type = LAYER if media_type == SCHEMA2 else "application/vnd.oci.image.layer.v1.tar+gzip"
    descs = [
        {"mediaType": layer_type, "digest": await reg.push_blob(repo, data), "size": len(data)}
        for data in layers
    ]
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": config_type,
            "digest": await reg.push_blob(repo, config),
            "size": len(config),
        },
        "layers": descs,
    }
    manifest = Manifest(media_type, json.dumps(doc).encode())
    await reg.put_manifest(repo, tag or manifest.digest, manifest)
    return manifest


async def push_index(
    reg: HttpRegistry, repo: str, tag: str, children: list[Manifest], arches: list[str]
) -> Manifest:
    """Push an OCI index of already pushed ``children`` under ``tag``."""
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": c.media_type,
                "digest": c.digest,
                "size": len(c.raw),
                "platform": {"architecture": a, "os": "linux"},
            }
            for c, a in zip(children, arches, strict=True)
        ],
    }
    index = Manifest(OCI_INDEX, json.dumps(doc).encode())
    await reg.put_manifest(repo, tag, index)
    return index


async def wait_for_digest(
    reg: HttpRegistry, repo: str, ref: str, digest: str, timeout: float = 30.0
) -> None:
    """Poll until ``repo:ref`` resolves to ``digest`` on ``reg``."""
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(TransientError):  # a 500 while the tag is being written
                if await reg.manifest_digest(repo, ref) == digest:
                    return
            await asyncio.sleep(0.1)
