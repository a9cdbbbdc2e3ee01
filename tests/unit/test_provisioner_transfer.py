"""The disk stream and identity archive of a migration: a sparse file through the source's
routes and back, its holes kept; a wrong token, a stream cut short."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from libs.common.errors import DomainError
from services.provisioner.adapters.transfer import (
    CHUNK,
    ExportOffer,
    Exports,
    TransferFailed,
    data_runs,
    fetch_disk,
    fetch_identity,
    identity_archive,
    read_frames,
)

TOKEN = "t" * 43
MIB = 1 << 20


def _sparse(path: Path) -> bytes:
    """64 MiB with 3 MiB of data in two places, one all-zero MiB written inside the first."""
    with open(path, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(5 * MIB)
        f.write(os.urandom(2 * MIB) + bytes(MIB))
        f.seek(40 * MIB + 123)
        f.write(os.urandom(MIB))
    return path.read_bytes()


@pytest.fixture
async def source(tmp_path):
    exports = Exports()
    app = web.Application()
    exports.add_routes(app)
    server = TestServer(app)
    await server.start_server()
    try:
        yield exports, str(server.make_url("/exports/m1"))
    finally:
        await server.close()


async def test_a_sparse_disk_arrives_whole_and_as_sparse(source, tmp_path):
    exports, url = source
    disk = tmp_path / "src.img"
    content = _sparse(disk)
    exports.offer(ExportOffer("m1", TOKEN, disk, b"identity", True))
    dest = tmp_path / "dst.img"
    async with aiohttp.ClientSession() as s:
        size, copied = await fetch_disk(s, url, TOKEN, dest)
        identity = await fetch_identity(s, url, TOKEN)

    assert dest.read_bytes() == content
    assert size == 64 * MIB
    # The holes and the written zero MiB were not sent (the unaligned write's last block was).
    assert 3 * MIB <= copied <= 3 * MIB + 4096
    assert dest.stat().st_blocks * 512 <= 4 * MIB  # and are holes on this side too
    assert len(data_runs(dest)) <= len(data_runs(disk))
    assert identity == b"identity"


async def test_a_wrong_token_or_no_offer_is_refused_and_leaves_no_file(source, tmp_path):
    exports, url = source
    disk = tmp_path / "src.img"
    _sparse(disk)
    exports.offer(ExportOffer("m1", TOKEN, disk, b"", True))
    dest = tmp_path / "dst.img"
    async with aiohttp.ClientSession() as s:
        with pytest.raises(DomainError) as wrong:
            await fetch_disk(s, url, "x" * 43, dest)
        exports.withdraw("m1")
        with pytest.raises(DomainError) as gone:
            await fetch_disk(s, url, TOKEN, dest)

    assert wrong.value.reason == gone.value.reason == "export_not_found"
    assert not dest.exists()


async def _frames(raw: bytes) -> list[tuple[int, bytes]]:
    reader = aiohttp.StreamReader(protocol=_Protocol(), limit=2 * CHUNK)
    reader.feed_data(raw)
    reader.feed_eof()
    return [f async for f in read_frames(reader)]


class _Protocol:
    _reading_paused = False

    def pause_reading(self, *args: object, **kwargs: object) -> None: ...

    def resume_reading(self, *args: object, **kwargs: object) -> None: ...


async def test_a_stream_cut_short_or_miscounted_fails():
    frame = (7).to_bytes(8, "big") + (3).to_bytes(8, "big") + b"abc"
    end = (2**64 - 1).to_bytes(8, "big")

    whole = await _frames(frame + end + (3).to_bytes(8, "big"))
    with pytest.raises(TransferFailed):
        await _frames(frame)  # no end frame
    with pytest.raises(TransferFailed):
        await _frames(frame + end + (4).to_bytes(8, "big"))  # says 4 bytes, carried 3

    assert whole == [(7, b"abc")]


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_the_identity_is_the_host_keys_and_app_only():
    ssh = _tar({"ssh/ssh_host_ed25519_key": b"k", "ssh/ssh_host_ed25519_key.pub": b"p",
                "ssh/sshd_config": b"c"})  # fmt: skip
    app = _tar({"app/current/app.jar": b"j"})

    with tarfile.open(fileobj=io.BytesIO(identity_archive(ssh, app))) as tar:
        names = sorted(tar.getnames())
    with tarfile.open(fileobj=io.BytesIO(identity_archive(ssh, None))) as tar:
        without_app = sorted(tar.getnames())

    assert names == ["app/current/app.jar", "etc/ssh/ssh_host_ed25519_key",
                     "etc/ssh/ssh_host_ed25519_key.pub"]  # fmt: skip
    assert without_app == names[1:]
