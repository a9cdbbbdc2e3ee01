"""Host commands (losetup, mkfs.xfs, mount, ovs-vsctl, ip, nsenter) run as async subprocesses.

They never block the event loop; a failing command raises :class:`HostCommandFailed` naming
the command and its stderr.
"""

from __future__ import annotations

import asyncio
import os

from libs.common.errors import DomainError

__all__ = ["HostCommandFailed", "run"]


class HostCommandFailed(DomainError):
    """A host command exited non-zero."""

    reason = "host_command_failed"

    def __init__(self, argv: tuple[str, ...], code: int, stderr: str) -> None:
        super().__init__(f"`{' '.join(argv)}` exited {code}: {stderr.strip()[:500]}")
        self.code = code
        self.stderr = stderr


async def run(*argv: str, check: bool = True, input: bytes | None = None) -> str:
    """Run ``argv`` and return its stdout; raise :class:`HostCommandFailed` when ``check``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
    )
    out, err = await proc.communicate(input)
    if check and proc.returncode != 0:
        raise HostCommandFailed(tuple(argv), proc.returncode or -1, err.decode(errors="replace"))
    return out.decode(errors="replace")
