"""Session recordings as asciicast v2 files, written as the session happens.

Events are whole lines gathered in memory and written in batches: when
:data:`FLUSH_BYTES` are waiting (bulk output) or :data:`FLUSH_S` after the first waiting event
(typing), whichever comes first. So what the kernel has survives the bastion being killed (even
with -9) up to the last second at worst: a reader (asciinema, or ``dockvm session play``) gets a
valid cast, without the events of that last moment. One write of a batch instead of one per
event keeps the recording's share of the bastion's CPU small (see docs/benchmarks.md). Files are
0600 under ``<state dir>/bastion/recordings/<YYYY-MM-DD>/<id>.cast``.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime
from pathlib import Path

import structlog

from .domain import CastEncoder

__all__ = ["FLUSH_BYTES", "FLUSH_S", "CastWriter", "read_chunk", "recording_path"]

log = structlog.get_logger("bastion.recording")

FLUSH_BYTES = 1 << 20
FLUSH_S = 0.5


def recording_path(root: Path, session_id: str, started: datetime) -> Path:
    """Where a session's cast is written."""
    return root / "recordings" / started.strftime("%Y-%m-%d") / f"{session_id}.cast"


def _write_all(fd: int, lines: list[bytes]) -> None:
    view = memoryview(b"".join(lines))
    while view:
        view = view[os.write(fd, view) :]


class CastWriter:
    """Appends asciicast v2 events to one file, in batches.

    An event takes its time and its place in the batch at once (no await in between), so times
    never go backwards in the cast though output, input and resizes come from different tasks.
    A batch is written in a thread while the relay goes on (a busy disk then slows the session
    instead of stalling the bastion's loop); batches are written in order, at most one in
    flight, and a session that has a full batch waiting waits for the one in flight. A write
    that fails (a full disk) fails the session: nothing goes unrecorded.
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
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._inflight: asyncio.Future[None] | None = None
        self._flushing = asyncio.Lock()
        self._timer: asyncio.TimerHandle | None = None
        self._timed: asyncio.Future[None] | None = None
        self._failed: BaseException | None = None
        header = CastEncoder.header(width, height, started, env, title)
        _write_all(self._fd, [header])
        self.size = len(header)

    def _t(self) -> float:
        return time.monotonic() - self._t0

    async def _add(self, line: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        if not line or self._fd is None:
            return
        self._pending.append(line)
        self._pending_size += len(line)
        self.size += len(line)
        if self._pending_size >= FLUSH_BYTES:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timed = asyncio.ensure_future(self.flush())
        self._timed.add_done_callback(self._note_failure)

    def _note_failure(self, task: asyncio.Future[None]) -> None:
        # The next event raises it, which ends the session.
        if not task.cancelled() and task.exception() is not None:
            self._failed = task.exception()

    async def flush(self) -> None:
        """Wait for the batch in flight, then start writing what is waiting."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        async with self._flushing:
            if self._inflight is not None:
                done, self._inflight = self._inflight, None
                await done
            if self._pending and self._fd is not None:
                lines, self._pending, self._pending_size = self._pending, [], 0
                loop = asyncio.get_running_loop()
                self._inflight = loop.run_in_executor(None, _write_all, self._fd, lines)

    async def output(self, data: bytes) -> None:
        """What the user saw."""
        await self._add(self._enc.event(self._t(), "o", data))

    async def input(self, data: bytes) -> None:
        """What the user typed (only when the grant records input)."""
        if self._record_input:
            await self._add(self._enc.event(self._t(), "i", data))

    async def resize(self, width: int, height: int) -> None:
        """The user's terminal changed size."""
        await self._add(CastEncoder.resize(self._t(), width, height))

    async def close(self) -> None:
        """Write what is waiting and close the file (idempotent; a write that fails here is
        logged: the session is over either way)."""
        try:
            await self.flush()
            async with self._flushing:
                if self._inflight is not None:
                    done, self._inflight = self._inflight, None
                    await done
        except OSError as err:
            log.error("recording not fully written", path=str(self.path), error=repr(err))
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
