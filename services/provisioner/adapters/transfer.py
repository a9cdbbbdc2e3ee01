"""Moving a machine between hosts: its data disk as a sparse stream, its identity as a tar.

The disk goes over HTTP, from the source agent's own port (``/exports/<machine_id>/disk``) to
the target agent, which asks for it with the one-time token the gateway gave both. The body is
the volume file's data and nothing else: frames of ``offset, length`` (two big-endian u64) and
that many bytes, for each run of non-zero data inside the file's data extents (``SEEK_DATA`` /
``SEEK_HOLE``; holes and zero blocks are never sent), then an end frame (``offset`` all ones,
``length`` the data bytes sent). The receiver writes each frame at its offset into a file
truncated to the disk's size, so the copy is as sparse as the original, and refuses a stream
cut short (no end frame, or a count that does not match).

The identity is what makes the machine itself beyond its disk, kept in its container's root
filesystem: its SSH host keys (``/etc/ssh/ssh_host_*``) and its installed release (``/app``).
It is read from the stopped container and put into the new one before its first start, so
sshd never answers with another key. IP, MAC and hostname need no copy: the IP and hostname
come with the import command, the MAC is derived from the machine id.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import io
import os
import struct
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiohttp
from aiohttp import web

from libs.common.errors import DomainError, NotFoundError, TransientError, translate_errors

from ..domain import container_name

__all__ = [
    "DockerIdentity",
    "ExportOffer",
    "Exports",
    "IdentityStore",
    "TransferFailed",
    "data_runs",
    "fetch_disk",
    "fetch_identity",
    "nonzero_runs",
    "read_frames",
]

T = TypeVar("T")
_HEAD = struct.Struct(">QQ")
_END = (1 << 64) - 1
CHUNK = 4 << 20
# The piece a zero check looks at: XFS's and cp's granularity is the block, 4 KiB; 64 KiB keeps
# the check's cost per chunk small and still finds the zeroed space a filesystem leaves.
ZERO_BLOCK = 64 << 10
_ZERO = bytes(ZERO_BLOCK)
# What of a machine's root filesystem is its identity.
SSH_DIR = "/etc/ssh"
APP_DIR = "/app"


class TransferFailed(TransientError):
    """The disk or identity stream broke, or the source refused it."""


def data_runs(path: Path) -> list[tuple[int, int]]:
    """The (offset, length) of each data extent of ``path`` (its holes left out)."""
    runs: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # ENXIO: nothing but a hole up to the end
            end = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, end - start))
            pos = end
    finally:
        os.close(fd)
    return runs


def nonzero_runs(chunk: bytes, block: int = ZERO_BLOCK) -> list[tuple[int, int]]:
    """The (start, end) of each run of ``block``-sized pieces of ``chunk`` that are not all
    zero: a zero block inside a data extent is a hole for the receiver too (cp --sparse)."""
    runs: list[tuple[int, int]] = []
    zero = _ZERO[:block]
    for at in range(0, len(chunk), block):
        piece = chunk[at : at + block]
        if piece == zero[: len(piece)]:
            continue
        end = min(at + block, len(chunk))
        if runs and runs[-1][1] == at:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((at, end))
    return runs


def _read(fd: int, offset: int, length: int) -> bytes:
    return os.pread(fd, length, offset)


async def stream_disk(path: Path, write: Callable[[bytes], Awaitable[None]]) -> int:
    """Write ``path``'s non-zero data as frames (then the end frame); the data bytes sent."""
    loop = asyncio.get_running_loop()
    runs = await loop.run_in_executor(None, data_runs, path)
    fd = os.open(path, os.O_RDONLY)
    sent = 0
    try:
        for start, length in runs:
            for off in range(start, start + length, CHUNK):
                n = min(CHUNK, start + length - off)
                chunk = await loop.run_in_executor(None, _read, fd, off, n)
                view = memoryview(chunk)
                for start_, end_ in nonzero_runs(chunk):
                    await write(_HEAD.pack(off + start_, end_ - start_) + view[start_:end_])
                    sent += end_ - start_
        await write(_HEAD.pack(_END, sent))
    finally:
        os.close(fd)
    return sent


async def read_frames(content: aiohttp.StreamReader) -> AsyncIterator[tuple[int, bytes]]:
    """The (offset, data) frames of a disk stream; TransferFailed if it ends without its end
    frame or its count does not match."""
    got = 0
    while True:
        try:
            offset, length = _HEAD.unpack(await content.readexactly(_HEAD.size))
        except asyncio.IncompleteReadError as err:
            raise TransferFailed("the disk stream ended before its end frame") from err
        if offset == _END:
            if length != got:
                raise TransferFailed(f"the disk stream carried {got} bytes, not {length}")
            return
        if length > CHUNK:
            raise TransferFailed(f"a frame of {length} bytes is larger than {CHUNK}")
        try:
            data = await content.readexactly(length)
        except asyncio.IncompleteReadError as err:
            raise TransferFailed("the disk stream ended inside a frame") from err
        got += length
        yield offset, data


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _get(session: aiohttp.ClientSession, url: str, token: str) -> aiohttp.ClientResponse:
    try:
        resp = await session.get(url, headers=_headers(token))
    except (aiohttp.ClientError, TimeoutError) as err:
        raise TransferFailed(f"source unreachable at {url}: {err}") from err
    if resp.status != 200:
        body = (await resp.text())[:200]
        resp.release()
        if resp.status in (403, 404):
            raise DomainError(
                f"source refused {url}: {resp.status} {body}", reason="export_not_found"
            )
        raise TransferFailed(f"source answered {resp.status} for {url}: {body}")
    return resp


async def fetch_disk(
    session: aiohttp.ClientSession, url: str, token: str, dest: Path
) -> tuple[int, int]:
    """Copy the exported disk at ``url`` into ``dest`` (made sparse, fsynced); return the disk's
    size and the data bytes copied. ``dest`` is removed if the copy fails."""
    resp = await _get(session, f"{url}/disk", token)
    size = int(resp.headers.get("X-Dockvm-Disk-Size", "-1"))
    if size < 0:
        resp.release()
        raise TransferFailed("the source sent no disk size")
    loop = asyncio.get_running_loop()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    copied = 0
    try:
        os.ftruncate(fd, size)
        async with resp:
            # Writes off the loop: the kernel may throttle a writer of many dirty pages, and
            # the stream keeps arriving meanwhile.
            async for offset, data in read_frames(resp.content):
                await loop.run_in_executor(None, os.pwrite, fd, data, offset)
                copied += len(data)
        await loop.run_in_executor(None, os.fsync, fd)
    except BaseException:
        os.close(fd)
        dest.unlink(missing_ok=True)
        raise
    os.close(fd)
    return size, copied


async def fetch_identity(session: aiohttp.ClientSession, url: str, token: str) -> bytes:
    """The exported identity archive (a tar to unpack at ``/``)."""
    resp = await _get(session, f"{url}/identity", token)
    async with resp:
        return await resp.read()


# ---- the source side: what an agent offers, served on its HTTP port -------------------------


@dataclass
class ExportOffer:
    """A machine offered for one import: its disk file, identity and credential."""

    machine_id: str
    token: str
    disk: Path
    identity: bytes
    was_running: bool
    at: float = field(default_factory=time.monotonic)


class Exports:
    """The offers of this agent, and the routes that serve them to an importing agent."""

    def __init__(self) -> None:
        self._offers: dict[str, ExportOffer] = {}

    def offer(self, offer: ExportOffer) -> None:
        """Offer ``offer``'s machine (replacing an earlier offer of it)."""
        self._offers[offer.machine_id] = offer

    def get(self, machine_id: str) -> ExportOffer | None:
        """The machine's offer, if any."""
        return self._offers.get(machine_id)

    def withdraw(self, machine_id: str) -> None:
        """End the machine's offer."""
        self._offers.pop(machine_id, None)

    def _authorised(self, request: web.Request) -> ExportOffer:
        offer = self._offers.get(request.match_info["machine_id"])
        if offer is None:
            raise web.HTTPNotFound(text="no export of this machine")
        given = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), offer.token.encode()):
            raise web.HTTPForbidden(text="wrong token")
        return offer

    async def _disk(self, request: web.Request) -> web.StreamResponse:
        offer = self._authorised(request)
        resp = web.StreamResponse(headers={"X-Dockvm-Disk-Size": str(offer.disk.stat().st_size),
                                           "Content-Type": "application/octet-stream"})  # fmt: skip
        await resp.prepare(request)
        await stream_disk(offer.disk, resp.write)
        await resp.write_eof()
        return resp

    async def _identity(self, request: web.Request) -> web.Response:
        offer = self._authorised(request)
        return web.Response(body=offer.identity, content_type="application/x-tar")

    def add_routes(self, app: web.Application) -> None:
        """Serve the offers on ``app`` (the agent's HTTP port)."""
        app.router.add_get("/exports/{machine_id}/disk", self._disk)
        app.router.add_get("/exports/{machine_id}/identity", self._identity)


# ---- the identity, read from and put into a container ---------------------------------------


class IdentityStore(Protocol):
    """Port: read a stopped machine's identity, put it into a created one."""

    async def read(self, machine_id: str) -> bytes:
        """The identity archive of the machine's container (a tar to unpack at ``/``)."""
        ...

    async def write(self, machine_id: str, archive: bytes) -> None:
        """Unpack ``archive`` at ``/`` in the machine's container (created, not started)."""
        ...


def _members(raw: bytes, keep: Callable[[str], bool]) -> list[tuple[tarfile.TarInfo, bytes]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        for member in tar.getmembers():
            if not keep(member.name):
                continue
            f = tar.extractfile(member) if member.isfile() else None
            out.append((member, f.read() if f is not None else b""))
    return out


def identity_archive(ssh: bytes, app: bytes | None) -> bytes:
    """One tar, rooted at ``/``, of the host keys in ``ssh`` (a tar of /etc/ssh) and the whole
    of ``app`` (a tar of /app, None if there is none)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for member, data in _members(ssh, lambda n: n.startswith("ssh/ssh_host_")):
            member.name = f"etc/{member.name}"
            out.addfile(member, io.BytesIO(data) if member.isfile() else None)
        for member, data in _members(app, lambda n: True) if app is not None else []:
            out.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return buf.getvalue()


class DockerIdentity:
    """:class:`IdentityStore` on the Docker Engine's archive API."""

    def __init__(self, base_url: str, workers: int = 2) -> None:
        import docker

        self._api = docker.APIClient(base_url=base_url, timeout=300, version="auto")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="identity")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, functools.partial(translate_errors(fn), *args)
        )

    def _tar(self, machine_id: str, path: str) -> bytes | None:
        import docker.errors

        try:
            stream, _ = self._api.get_archive(container_name(machine_id), path)
        except docker.errors.NotFound:
            return None
        return b"".join(stream)

    def _read(self, machine_id: str) -> bytes:
        ssh = self._tar(machine_id, SSH_DIR)
        if ssh is None:
            raise NotFoundError(f"machine {machine_id} has no {SSH_DIR}")
        return identity_archive(ssh, self._tar(machine_id, APP_DIR))

    async def read(self, machine_id: str) -> bytes:
        """The host keys and /app of the machine's container."""
        return await self._call(self._read, machine_id)

    def _write(self, machine_id: str, archive: bytes) -> None:
        if not self._api.put_archive(container_name(machine_id), "/", archive):
            raise NotFoundError(f"could not put the identity into machine {machine_id}")

    async def write(self, machine_id: str, archive: bytes) -> None:
        """Unpack the identity into the machine's container."""
        await self._call(self._write, machine_id, archive)

    def close(self) -> None:
        """Release the thread pool and the connection."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._api.close()
