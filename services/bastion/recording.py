"""Session recordings as asciicast v2 files, written as the session happens.

Every event is one whole line written on an unbuffered file (at most one in flight), so what
the kernel has survives the bastion being killed (even with -9) up to the last event: a reader
(asciinema, or ``dockvm session play``) gets a valid cast, at worst without the last partial
line, which a reader skips. Files are 0600 under
``<state dir>/bastion/recordings/<YYYY-MM-DD>/<id>.cast``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from .domain import CastEncoder

__all__ = ["CastWriter", "read_chunk", "recording_path"]


def recording_path(root: Path, session_id: str, started: datetime) -> Path:
    """Where a session's cast is written."""
    return root / "recordings" / started.strftime("%Y-%m-%d") / f"{session_id}.cast"


def _write_all(fd: int, line: bytes) -> None:
    view = memoryview(line)
    while view:
        view = view[os.write(fd, view) :]


class CastWriter:
    """Appends asciicast v2 events to one file, one write per event.

    The write of an event runs in a thread while the relay goes on with the next chunk (a busy
    disk then slows the session instead of stalling the bastion's loop); events are written in
    order, and at most one is in flight, so a crash loses at most that one. A write that fails
    (a full disk) fails the session: nothing goes unrecorded.
    """

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        started: datetime,
        env: dict[str, str],
        title: str,
        *,
        record_input: bool,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._t0 = time.monotonic()
        self._enc = CastEncoder()
        self._record_input = record_input
        self._inflight: asyncio.Future[None] | None = None
        # Output, input and resizes come from different tasks: each event takes its time and its
        # place in the file under one lock, so times never go backwards in the cast.
        self._order = asyncio.Lock()
        header = CastEncoder.header(width, height, started, env, title)
        _write_all(self._fd, header)
        self.size = len(header)

    async def _write(self, line: bytes) -> None:
        if self._inflight is not None:
            done, self._inflight = self._inflight, None
            await done
        if self._fd is not None and line:
            self.size += len(line)
            loop = asyncio.get_running_loop()
            self._inflight = loop.run_in_executor(None, _write_all, self._fd, line)

    def _t(self) -> float:
        return time.monotonic() - self._t0

    async def _record(self, line: Callable[[float], bytes]) -> None:
        async with self._order:
            await self._write(line(self._t()))

    async def output(self, data: bytes) -> None:
        """What the user saw."""
        await self._record(lambda t: self._enc.event(t, "o", data))

    async def input(self, data: bytes) -> None:
        """What the user typed (only when the grant records input)."""
        if self._record_input:
            await self._record(lambda t: self._enc.event(t, "i", data))

    async def resize(self, width: int, height: int) -> None:
        """The user's terminal changed size."""
        await self._record(lambda t: CastEncoder.resize(t, width, height))

    async def close(self) -> None:
        """Finish the last write and close the file (idempotent)."""
        try:
            if self._inflight is not None:
                done, self._inflight = self._inflight, None
                await done
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_chunk(path: Path, offset: int, limit: int) -> tuple[bytes, int]:
    """Up to ``limit`` bytes from ``offset``, cut after the last whole line when there is one;
    returns (data, file size)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(offset)
        data = f.read(limit)
    cut = data.rfind(b"\n")
    if 0 <= cut < len(data) - 1 and offset + len(data) < size:
        data = data[: cut + 1]
    return data, size
