"""Host commands (losetup, mkfs.xfs, mount, ovs-vsctl, ip, nsenter) run as async subprocesses.

They never block the event loop; a failing command raises :class:`HostCommandFailed` naming
the command and its stderr. No command may run forever: ``ovs-vsctl`` blocks for good when
ovsdb is down, and so does ``losetup`` on a stuck loop device, and either would pin a machine's
lock, a create slot and the reconcile loop. Each command runs in its own session (its own
process group) under a timeout; on expiry, or when the caller is cancelled, the whole group is
killed and :class:`HostCommandTimedOut` (transient: the next attempt may find ovsdb back) is
raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass

import structlog

from libs.common.errors import DomainError, TransientError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "HostCommandFailed",
    "HostCommandTimedOut",
    "HostCommands",
    "run",
]

log = structlog.get_logger("provisioner.host")

DEFAULT_TIMEOUT_S = 60.0
# How long to wait for a killed group's leader to be reaped: a process in uninterruptible sleep
# (a loop device stuck in the kernel) ignores SIGKILL, and must not hang its caller instead.
_REAP_S = 2.0


class HostCommandFailed(DomainError):
    """A host command exited non-zero."""

    reason = "host_command_failed"

    def __init__(self, argv: tuple[str, ...], code: int, stderr: str) -> None:
        super().__init__(f"`{' '.join(argv)}` exited {code}: {stderr.strip()[:500]}")
        self.code = code
        self.stderr = stderr


class HostCommandTimedOut(TransientError):
    """A host command did not finish within its timeout; its process group was killed."""

    def __init__(
        self, argv: tuple[str, ...], timeout_s: float, how: str = "its process group was killed"
    ) -> None:
        super().__init__(f"`{' '.join(argv)}` did not finish within {timeout_s:g}s; {how}")
        self.argv = argv
        self.timeout_s = timeout_s


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


async def _reap(proc: asyncio.subprocess.Process, argv: tuple[str, ...]) -> None:
    try:
        async with asyncio.timeout(_REAP_S):
            await proc.wait()
    except TimeoutError:
        log.error("killed host command did not exit", command=" ".join(argv), pid=proc.pid)


async def run(
    *argv: str,
    check: bool = True,
    input: bytes | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> str:
    """Run ``argv`` and return its stdout; raise :class:`HostCommandFailed` when ``check``,
    :class:`HostCommandTimedOut` past ``timeout_s``."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
        # Its own process group, so a kill reaches what it forked too.
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate(input)
    except TimeoutError as exc:
        _kill_group(proc)
        await _reap(proc, argv)
        raise HostCommandTimedOut(tuple(argv), timeout_s) from exc
    except BaseException:
        # The caller was cancelled (its own bound expired): the command must not outlive it.
        _kill_group(proc)
        await asyncio.shield(_reap(proc, argv))
        raise
    # ovs-vsctl --timeout ends itself with SIGALRM: the same transient fault as our own kill.
    if proc.returncode == -signal.SIGALRM:
        raise HostCommandTimedOut(tuple(argv), timeout_s, "it gave up on its own alarm")
    if check and proc.returncode != 0:
        raise HostCommandFailed(tuple(argv), proc.returncode or -1, err.decode(errors="replace"))
    return out.decode(errors="replace")


@dataclass(frozen=True)
class HostCommands:
    """Host commands under one timeout (``DOCKVM_HOST_COMMAND_TIMEOUT_S``)."""

    timeout_s: float = DEFAULT_TIMEOUT_S

    async def run(self, *argv: str, check: bool = True, input: bytes | None = None) -> str:
        """:func:`run` with this timeout."""
        return await run(*argv, check=check, input=input, timeout_s=self.timeout_s)

    def ovs_vsctl(self, *args: str) -> tuple[str, ...]:
        """The argv of an ``ovs-vsctl`` call that gives up by itself well within the timeout."""
        # Half the timeout, so ovs-vsctl's own exit (SIGALRM) comes before our kill.
        return ("ovs-vsctl", f"--timeout={max(1, int(self.timeout_s // 2))}", *args)
