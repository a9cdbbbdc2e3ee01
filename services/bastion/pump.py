"""The bytes of one session between the user's channel and the machine's, recorded on the way.

Up (user → machine): keystrokes or stdin, with terminal size changes, signals and breaks passed
on; in a shell each line goes through the command rules first. Down (machine → user): stdout
and stderr as they come. Everything the user sees is written to the cast before the next read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncssh

from .domain import CTRL_C, CompiledRule, LineFilter
from .recording import CastWriter
from .service import LiveSession

__all__ = ["Pump"]

CHUNK = 256 * 1024
Check = Callable[[str], CompiledRule | None]
OnBlocked = Callable[[str, CompiledRule], Awaitable[None]]


class Pump:
    """Moves one session's bytes both ways until the machine's side ends."""

    def __init__(
        self,
        user: asyncssh.SSHServerProcess,
        remote: asyncssh.SSHClientProcess,
        cast: CastWriter,
        live: LiveSession,
        *,
        check: Check | None,
        on_blocked: OnBlocked,
    ) -> None:
        self._user = user
        self._remote = remote
        self._cast = cast
        self._live = live
        self._check = check
        self._on_blocked = on_blocked
        self._filter = LineFilter()
        self.bytes_in = 0
        self.bytes_out = 0

    async def run(self, typed: bytes = b"") -> None:
        """Relay until the machine closes its side (or the user's goes away); ``typed`` is
        input the user sent before the relay started (after her pick in the menu)."""
        if typed:
            await self._input(typed)
        up = asyncio.ensure_future(self._up())
        try:
            await asyncio.gather(
                self._down(self._remote.stdout, self._user.stdout),
                self._down(self._remote.stderr, self._user.stderr),
            )
        finally:
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)

    async def _down(self, src: asyncssh.SSHReader[bytes], dst: asyncssh.SSHWriter[bytes]) -> None:
        while True:
            data = await src.read(CHUNK)
            if not data:
                return
            await self._cast.output(data)
            self.bytes_out += len(data)
            self._live.touch()
            try:
                dst.write(data)
                await dst.drain()
            except (BrokenPipeError, ConnectionError, asyncssh.Error):
                return  # the user is gone; the machine's side is closed by the caller

    async def _up(self) -> None:
        stdin = self._user.stdin
        while True:
            try:
                data = await stdin.read(CHUNK)
            except asyncssh.TerminalSizeChanged as change:
                self._remote.change_terminal_size(
                    change.width, change.height, change.pixwidth, change.pixheight
                )
                await self._cast.resize(change.width, change.height)
                continue
            except asyncssh.SignalReceived as sig:
                self._remote.send_signal(sig.signal)
                continue
            except asyncssh.BreakReceived as brk:
                self._remote.send_break(brk.msec)
                continue
            except (BrokenPipeError, ConnectionError, asyncssh.Error):
                data = b""
            if not data:
                self._remote.stdin.write_eof()
                return
            await self._input(data)

    async def _input(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._live.touch()
        await self._cast.input(data)
        await self._send(data)

    async def _send(self, data: bytes) -> None:
        if self._check is None:
            self._remote.stdin.write(data)
            await self._remote.stdin.drain()
            return
        for piece, line in self._filter.feed(data):
            rule = self._check(line) if line is not None and line.strip() else None
            if rule is None:
                self._remote.stdin.write(piece)
                continue
            # The typed characters already reached the shell; Ctrl-C makes it drop the line.
            self._remote.stdin.write(piece[:-1] + CTRL_C)
            note = f"\r\nbastion: blocked by command rule {rule.id} ({rule.pattern})\r\n"
            self._user.stdout.write(note.encode())
            await self._cast.output(note.encode())
            await self._on_blocked(line or "", rule)
        await self._remote.stdin.drain()
