"""The menu ``ssh -p 2222 alice@bastion`` shows: the machines she may reach, one to pick."""

from __future__ import annotations

import asyncssh

from .domain import Refused, Target, parse_target
from .service import Access

__all__ = ["choose_target"]

_MAX_LINE = 512


async def _read_line(process: asyncssh.SSHServerProcess, echo: bool) -> tuple[str | None, bytes]:
    """One line typed by the user (echoed back on a PTY), and what she typed after it;
    None on Ctrl-C, Ctrl-D or EOF."""
    line = bytearray()
    while len(line) < _MAX_LINE:
        try:
            data = await process.stdin.read(1024)
        except (asyncssh.TerminalSizeChanged, asyncssh.SignalReceived, asyncssh.BreakReceived):
            continue
        if not data:
            return None, b""
        for i, b in enumerate(data):
            if b in (0x0D, 0x0A):
                if echo:
                    process.stdout.write(b"\r\n")
                rest = data[i + 1 :]
                if b == 0x0D and rest[:1] == b"\n":
                    rest = rest[1:]
                return line.decode("utf-8", "replace").strip(), rest
            if b in (0x03, 0x04):
                return None, b""
            if b in (0x7F, 0x08):
                if line:
                    del line[-1]
                    if echo:
                        process.stdout.write(b"\b \b")
            elif b >= 0x20:
                line.append(b)
                if echo:
                    process.stdout.write(bytes([b]))
    return line.decode("utf-8", "replace").strip(), b""


async def choose_target(
    process: asyncssh.SSHServerProcess, access: Access, user: str
) -> tuple[Target | None, bytes]:
    """List what ``user`` may reach and read her pick (None if she picks nothing), with what
    she typed after it (for the machine)."""
    choices = await access.reachable(user)
    if not choices:
        raise Refused("no machine is granted to you", reason="no_grant")
    pty = process.get_terminal_type() is not None
    nl = "\r\n" if pty else "\n"
    rows = [f"Machines you may reach, {user}:"]
    for i, (m, g) in enumerate(choices, 1):
        rows.append(
            f"  {i:>3}) {m['hostname']:<24} {m.get('ip') or '-':<15} {m['_id']:<22} "
            f"app {m['app']}, as {g['login']}"
        )
    process.stdout.write((nl.join(rows) + nl + "Number or login@machine (empty: quit): ").encode())
    answer, rest = await _read_line(process, echo=pty)
    if not answer:
        return None, b""
    if answer.isdigit():
        n = int(answer)
        if not 1 <= n <= len(choices):
            raise Refused(f"no machine number {n} (1-{len(choices)})", reason="bad_target")
        machine, grant = choices[n - 1]
        return Target(grant["login"], machine["_id"], None), rest
    return parse_target(answer), rest
