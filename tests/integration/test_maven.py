"""The Maven client against the local repository that `mvn deploy:deploy-file` populated."""

from __future__ import annotations

import os
import re
import shutil
import tarfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from libs.common.contracts.releases import Artifact
from libs.common.errors import NotFoundError, TransientError
from libs.common.maven import ChecksumMismatch, InvalidMetadata, MavenRepository
from tests.unit.test_maven import BILLION_LAUGHS, EXTERNAL_ENTITY

MAVEN_URL = os.environ.get("DOCKVM_MAVEN_URL", "http://127.0.0.1:8090")
MAVEN_DIR = Path(os.environ.get("DOCKVM_STATE_DIR", "/var/lib/dockvm")) / "maven"


def demo(version: str) -> Artifact:
    return Artifact(group_id="com.example", artifact_id="demo-app", version=version)


def version_in(tarball: Path) -> str:
    with tarfile.open(tarball) as tar:
        return tar.extractfile("./VERSION").read().decode().strip()  # type: ignore[union-attr]


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.mark.parametrize("version", ["1.0.0", "2.0.0"])
async def test_release_downloads_and_verifies(session, tmp_path, version):
    path = await MavenRepository(MAVEN_URL, session).download(demo(version), tmp_path)

    assert path.name == f"demo-app-{version}.tar.gz"
    assert version_in(path) == version


async def test_snapshot_resolves_through_metadata(session, tmp_path):
    repo = MavenRepository(MAVEN_URL, session)

    resolved = await repo.resolve(demo("2.1.0-SNAPSHOT"))
    path = await repo.download(demo("2.1.0-SNAPSHOT"), tmp_path)

    # A timestamped build: 2.1.0-<yyyymmdd.hhmmss>-<build number>.
    assert re.fullmatch(r"2\.1\.0-\d{8}\.\d{6}-\d+", resolved.file_version)
    assert version_in(path) == "2.1.0-SNAPSHOT"


async def test_unknown_artifact_is_not_found(session, tmp_path):
    with pytest.raises(NotFoundError, match="not found"):
        await MavenRepository(MAVEN_URL, session).download(demo("9.9.9"), tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_unreachable_repository_is_transient(session, tmp_path):
    with pytest.raises(TransientError, match="unreachable"):
        await MavenRepository("http://127.0.0.1:1", session).download(demo("1.0.0"), tmp_path)


async def _serve(root: Path):
    """Serve ``root`` over HTTP on loopback; yield its URL."""
    app = web.Application()
    app.router.add_static("/", root)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.fixture
async def tampered_repo(tmp_path):
    """A copy of the real repository served over HTTP, with 1.0.0's bytes swapped for 2.0.0's."""
    root = tmp_path / "repo"
    shutil.copytree(MAVEN_DIR, root)
    base = root / "com/example/demo-app"
    shutil.copy(base / "2.0.0/demo-app-2.0.0.tar.gz", base / "1.0.0/demo-app-1.0.0.tar.gz")
    async for url in _serve(root):
        yield url


@pytest.fixture
async def hostile_repo(tmp_path):
    """A repository whose SNAPSHOT metadata is an entity bomb (6.6.6) or reads a file (7.7.7)."""
    base = tmp_path / "hostile/com/example/demo-app"
    for version, document in [("6.6.6", BILLION_LAUGHS), ("7.7.7", EXTERNAL_ENTITY)]:
        (base / f"{version}-SNAPSHOT").mkdir(parents=True)
        (base / f"{version}-SNAPSHOT/maven-metadata.xml").write_text(document)
    async for url in _serve(tmp_path / "hostile"):
        yield url


async def test_checksum_mismatch_keeps_nothing(session, tmp_path, tampered_repo):
    dest = tmp_path / "dest"

    with pytest.raises(ChecksumMismatch, match="sha1"):
        await MavenRepository(tampered_repo, session).download(demo("1.0.0"), dest)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("version", ["6.6.6-SNAPSHOT", "7.7.7-SNAPSHOT"])
async def test_hostile_metadata_is_refused_and_keeps_nothing(
    session, tmp_path, hostile_repo, version
):
    dest = tmp_path / "dest"

    with pytest.raises(InvalidMetadata, match="refused: DTDForbidden"):
        await MavenRepository(hostile_repo, session).download(demo(version), dest)
    assert not dest.exists()
