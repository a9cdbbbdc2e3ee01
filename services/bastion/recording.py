"""Session recordings as asciicast v2 files, written as the session happens.

Every event is one ``os.write`` of one whole line on an unbuffered file, so what the kernel has
survives the bastion being killed (even with -9) up to the last event: a reader (asciinema, or
``dockvm session play``) gets a valid cast, at worst without the last partial line, which a
reader skips. Files are 0600 under ``<state dir>/bastion/recordings/<YYYY-MM-DD>/<id>.cast``.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from pathlib import Path

from .domain import CastEncoder

__all__ = ["CastWriter", "read_chunk", "recording_path"]


def recording_path(root: Path, session_id: str, started: datetime) -> Path:
    """Where a session's cast is written."""
    return root / "recordings" / started.strftime("%Y-%m-%d") / f"{session_id}.cast"


class CastWriter:
    """Appends asciicast v2 events to one file, one write per event."""

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
        self.size = 0
        self._write(CastEncoder.header(width, height, started, env, title))

    def _write(self, line: bytes) -> None:
        if self._fd is not None and line:
            self.size += os.write(self._fd, line)

    def _t(self) -> float:
        return time.monotonic() - self._t0

    def output(self, data: bytes) -> None:
        """What the user saw."""
        self._write(self._enc.event(self._t(), "o", data))

    def input(self, data: bytes) -> None:
        """What the user typed (only when the grant records input)."""
        if self._record_input:
            self._write(self._enc.event(self._t(), "i", data))

    def resize(self, width: int, height: int) -> None:
        """The user's terminal changed size."""
        self._write(CastEncoder.resize(self._t(), width, height))

    def close(self) -> None:
        """Close the file (idempotent)."""
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
