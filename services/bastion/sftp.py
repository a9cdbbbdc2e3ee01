"""SFTP (and scp, which speaks SFTP) through the bastion, with paths that name the machine.

``/`` lists the machines the user may reach as directories named ``login@IP``; everything under
``/root@10.0.0.5/`` is that machine's file system, reached with an SFTP session of the
bastion's own connection (the grant is checked when a machine is first named). Each machine
used is one session (kind ``sftp``): every file closed after reading or writing is announced
as ``transfer.done`` with its path, the bytes moved and the direction, and is listed in the
session's record (``transfers``, the first :data:`MAX_SESSION_TRANSFERS`, and
``transfer_count``), saved at most once a second while the session lasts and at its end. Such
a session has no terminal recording: its record is its transfer log (``bastion.recording.get``
answers not_found and says so). Revoking the grant ends the SFTP channel.
"""

from __future__ import annotations

import asyncio
import posixpath
import stat as st
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncssh
import structlog

from libs.common.bus import Publisher
from libs.common.clock import utcnow
from libs.common.contracts.bastion import MAX_SESSION_TRANSFERS, TransferDone
from libs.common.errors import DomainError, NotFoundError

from .domain import Target, split_sftp_path
from .machine import MachineConnector, new_session_id, session_doc
from .service import Access, LiveSession, LiveSessions

__all__ = ["SftpGate", "SftpProxy"]

log = structlog.get_logger("bastion.sftp")

_DIR = asyncssh.SFTPAttrs(type=asyncssh.FILEXFER_TYPE_DIRECTORY, permissions=st.S_IFDIR | 0o555)


@dataclass
class SftpGate:
    """What every SFTP channel of the bastion uses."""

    access: Access
    live: LiveSessions
    machines: MachineConnector
    publisher: Publisher


@dataclass
class _Machine:
    """One machine opened in an SFTP channel."""

    conn: asyncssh.SSHClientConnection
    sftp: asyncssh.SFTPClient
    session: LiveSession
    prefix: str
    stats: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    transfers: list[dict[str, Any]] = field(default_factory=list)
    transfer_count: int = 0
    saved_at: float = 0.0  # monotonic time the transfers were last saved

    def log(self) -> dict[str, object]:
        """The session's transfer fields."""
        return {"transfers": list(self.transfers), "transfer_count": self.transfer_count}


@dataclass
class _File:
    """An open remote file, and what went through it."""

    remote: asyncssh.SFTPClientFile
    machine: _Machine
    path: str
    upload: bool
    moved: int = 0


class SftpProxy(asyncssh.SFTPServer):
    """An SFTP server whose files are those of the machines named in its paths."""

    def __init__(self, chan: asyncssh.SSHServerChannel, gate: SftpGate) -> None:
        super().__init__(chan)
        self._gate = gate
        self._user: str = chan.get_extra_info("username")
        peer = chan.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else None
        self._open: dict[str, _Machine] = {}
        self._lock = asyncio.Lock()
        self._finishing: asyncio.Future[None] | None = None

    async def _machine(self, path: bytes) -> tuple[_Machine | None, str]:
        text = posixpath.normpath("/" + path.decode("utf-8", "surrogateescape"))
        try:
            target, rest = split_sftp_path(text)
        except DomainError as err:
            raise asyncssh.SFTPNoSuchFile(f"bastion: {err}") from err
        if target is None:
            return None, "/"
        async with self._lock:
            m = self._open.get(str(target))
            if m is None:
                m = await self._start(target)
                self._open[str(target)] = m
        return m, rest

    async def _start(self, target: Target) -> _Machine:
        gate = self._gate
        try:
            auth = await gate.access.authorize(self._user, target)
            sid = new_session_id()
            conn = await gate.machines.connect(auth, sid)
        except DomainError as err:
            await gate.access.refused(self._user, err, target=str(target), client_addr=self._peer)
            kind = asyncssh.SFTPNoSuchFile if isinstance(err, NotFoundError) else None
            raise (kind or asyncssh.SFTPPermissionDenied)(f"bastion: {err}") from err
        sftp = await conn.start_sftp_client()
        doc = session_doc(gate.live.owner, auth, sid, "sftp", None, self._peer, None)
        session = LiveSession(doc, auth.user["uid"], on_end=lambda _r: self._end())
        await gate.live.start(session)
        return _Machine(conn, sftp, session, f"/{target}")

    def _end(self) -> None:
        """A grant went: close every machine and the user's channel."""
        for m in self._open.values():
            m.conn.close()
        self.channel.close()

    async def _finish(self) -> None:
        for m in self._open.values():
            m.conn.close()
            fields = {"exit_status": None, "bytes_in": m.stats["in"], "bytes_out": m.stats["out"],
                      **m.log()}  # fmt: skip
            try:
                await self._gate.live.finish(m.session, fields)
            except Exception:
                log.exception("sftp session end not recorded", session_id=m.session.id)
        self._open.clear()

    def exit(self) -> None:
        """The client is done: end its sessions, and say so with an exit status (OpenSSH's scp
        reports a failure without one)."""
        self._finishing = asyncio.ensure_future(self._finish())
        try:
            self.channel.exit(0)
        except (OSError, asyncssh.Error):
            pass  # the channel is already gone

    # ---- paths ----------------------------------------------------------------------------

    async def realpath(self, path: bytes) -> bytes:
        """``/login@ip`` + the machine's own real path."""
        m, rest = await self._machine(path)
        if m is None:
            return b"/"
        real = await m.sftp.realpath(rest.encode())
        return (m.prefix + real.decode("utf-8", "surrogateescape")).encode()

    async def stat(self, path: bytes) -> asyncssh.SFTPAttrs:
        """Attributes of a path (``/`` is a directory)."""
        m, rest = await self._machine(path)
        return _DIR if m is None else await m.sftp.stat(rest.encode())

    async def lstat(self, path: bytes) -> asyncssh.SFTPAttrs:
        """Attributes of a path, not following a last symlink."""
        m, rest = await self._machine(path)
        return _DIR if m is None else await m.sftp.lstat(rest.encode())

    async def scandir(self, path: bytes) -> AsyncIterator[asyncssh.SFTPName]:
        """``/``: the reachable machines; below: the machine's directory."""
        m, rest = await self._machine(path)
        if m is None:
            for name in (b".", b".."):
                yield asyncssh.SFTPName(name, attrs=_DIR)
            for machine, grant in await self._gate.access.reachable(self._user):
                if machine.get("ip"):
                    name = f"{grant['login']}@{machine['ip']}".encode()
                    yield asyncssh.SFTPName(name, attrs=_DIR)
            return
        async for entry in m.sftp.scandir(rest.encode()):
            yield entry

    async def _remote_op(self, op: str, path: bytes, *args: Any) -> Any:
        m, rest = await self._machine(path)
        if m is None:
            raise asyncssh.SFTPPermissionDenied("bastion: / holds machines, not files")
        return await getattr(m.sftp, op)(rest.encode(), *args)

    async def setstat(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Change attributes."""
        await self._remote_op("setstat", path, attrs)

    async def remove(self, path: bytes) -> None:
        """Remove a file."""
        await self._remote_op("remove", path)

    async def mkdir(self, path: bytes, attrs: asyncssh.SFTPAttrs) -> None:
        """Make a directory."""
        await self._remote_op("mkdir", path, attrs)

    async def rmdir(self, path: bytes) -> None:
        """Remove a directory."""
        await self._remote_op("rmdir", path)

    async def readlink(self, path: bytes) -> bytes:
        """Where a symlink points."""
        return await self._remote_op("readlink", path)

    async def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        """The file system's usage (``df``)."""
        return await self._remote_op("statvfs", path)

    async def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        """Make a symlink (its target is taken as is, on the machine)."""
        m, rest = await self._machine(newpath)
        if m is None:
            raise asyncssh.SFTPPermissionDenied("bastion: / holds machines, not files")
        await m.sftp.symlink(oldpath, rest.encode())

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        """Rename within one machine."""
        (a, old), (b, new) = await self._machine(oldpath), await self._machine(newpath)
        if a is None or a is not b:
            raise asyncssh.SFTPOpUnsupported("bastion: rename stays within one machine")
        await a.sftp.rename(old.encode(), new.encode())

    posix_rename = rename

    # ---- files ----------------------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> _File:
        """Open a file on the machine."""
        m, rest = await self._machine(path)
        if m is None:
            raise asyncssh.SFTPPermissionDenied("bastion: / holds machines, not files")
        remote = await m.sftp.open(rest.encode(), pflags, attrs, encoding=None)
        upload = bool(pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_APPEND))
        return _File(remote, m, rest, upload)

    async def read(self, file_obj: _File, offset: int, size: int) -> bytes:
        """Read from an open file."""
        data = await file_obj.remote.read(size, offset)
        file_obj.moved += len(data)
        file_obj.machine.stats["out"] += len(data)
        file_obj.machine.session.touch()
        return data

    async def write(self, file_obj: _File, offset: int, data: bytes) -> int:
        """Write to an open file."""
        await file_obj.remote.write(data, offset)
        file_obj.moved += len(data)
        file_obj.machine.stats["in"] += len(data)
        file_obj.machine.session.touch()
        return len(data)

    async def fstat(self, file_obj: _File) -> asyncssh.SFTPAttrs:
        """Attributes of an open file."""
        return await file_obj.remote.stat()

    async def fsetstat(self, file_obj: _File, attrs: asyncssh.SFTPAttrs) -> None:
        """Change attributes of an open file."""
        await file_obj.remote.setstat(attrs)

    async def close(self, file_obj: _File) -> None:
        """Close a file and announce the transfer."""
        await file_obj.remote.close()
        m = file_obj.machine
        s = m.session.doc
        done = TransferDone(
            session_id=s["_id"],
            user=s["user"],
            login=s["login"],
            machine_id=s["machine_id"],
            ip=s["ip"],
            path=file_obj.path,
            size=file_obj.moved,
            direction="upload" if file_obj.upload else "download",
            at=utcnow(),
        )
        await self._gate.publisher.publish(done)
        m.transfer_count += 1
        if len(m.transfers) < MAX_SESSION_TRANSFERS:
            m.transfers.append(done.model_dump(include={"path", "size", "direction", "at"}))
        # Many small files: one write a second at most; the end of the session writes the rest.
        if time.monotonic() - m.saved_at >= 1.0:
            m.saved_at = time.monotonic()
            try:
                await self._gate.live.note(m.session, m.log())
            except Exception:
                log.exception("sftp transfers not recorded yet", session_id=m.session.id)
