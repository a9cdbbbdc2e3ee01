"""One SSH session channel of the bastion: parse the request, check the grant, connect to the
machine with a fresh certificate, relay and record, and say how it ended.

``ssh -p 2222 alice@bastion root@10.0.0.5 uptime`` arrives as an exec request whose command is
``root@10.0.0.5 uptime``: the first word names the target (``[login@]IP|machine id|hostname``),
the rest is the command run on the machine. A target alone opens a shell there (with a PTY when
the client asked for one, ``ssh -t``); no command at all shows the menu of reachable machines.

The machine is reached with the bastion's own SSH connection, as the grant's login, with a
key made for this session and a certificate signed by the user CA, valid a few minutes (see
:mod:`.machine`).

Every failure before the relay starts is one line on the user's stderr and a non-zero exit
status (1; 126 for a command a rule refused), and nothing stays open.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncssh
import structlog

from libs.common.clock import utcnow
from libs.common.errors import DomainError

from .documents import SessionDoc
from .domain import Refused, Target, parse_request
from .machine import MachineConnector, new_session_id, session_doc
from .menu import choose_target
from .pump import Pump
from .recording import CastWriter, recording_path
from .service import Access, Authorized, LiveSession, LiveSessions

__all__ = ["Relay"]

log = structlog.get_logger("bastion.relay")

EXIT_REFUSED = 1
EXIT_BLOCKED = 126
EXIT_ENDED = 255


def _peer(process: asyncssh.SSHServerProcess) -> str | None:
    peer = process.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else None


def _say(process: asyncssh.SSHServerProcess, text: str) -> None:
    """One line on the user's stderr (never raises: she may be gone)."""
    end = "\r\n" if process.get_terminal_type() else "\n"
    try:
        process.stderr.write(f"bastion: {text}{end}".encode())
    except (BrokenPipeError, ConnectionError, asyncssh.Error):
        pass


def _exit(process: asyncssh.SSHServerProcess, status: int, signal: Any = None) -> None:
    try:
        if signal:
            process.exit_with_signal(*signal)
        else:
            process.exit(status)
    except (BrokenPipeError, ConnectionError, asyncssh.Error, OSError):
        pass


class Relay:
    """Serves every session channel the bastion's SSH server accepts."""

    def __init__(
        self, access: Access, live: LiveSessions, machines: MachineConnector, state_dir: Path
    ) -> None:
        self._access = access
        self._live = live
        self._machines = machines
        self._state_dir = state_dir

    async def handle(self, process: asyncssh.SSHServerProcess) -> None:
        """The process factory: one exec, shell or subsystem request."""
        user = process.get_extra_info("username")
        peer = _peer(process)
        target_text = None
        try:
            if process.subsystem:
                msg = f"subsystem {process.subsystem!r} is not offered"
                raise Refused(msg, reason="bad_target")
            target, command = parse_request(process.command)
            target_text = str(target) if target else None
            typed = b""
            if target is None:
                target, typed = await choose_target(process, self._access, user)
                if target is None:
                    _exit(process, 0)
                    return
                target_text = str(target)
            await self._session(process, user, peer, target, command, typed)
        except DomainError as err:
            await self._access.refused(user, err, target=target_text, client_addr=peer)
            _say(process, str(err))
            _exit(process, EXIT_BLOCKED if err.reason == "command_blocked" else EXIT_REFUSED)
        except Exception:
            log.exception("session failed", user=user, target=target_text)
            _say(process, "internal error; the session is closed")
            _exit(process, EXIT_REFUSED)

    async def _refuse_command(self, auth: Authorized, command: str) -> None:
        rule = self._live.blocking_rule(command)
        if rule is None:
            return
        m = auth.machine
        facts = {
            "user": auth.user["_id"],
            "login": auth.login,
            "machine_id": m["_id"],
            "ip": m.get("ip"),
            "kind": "exec",
        }
        await self._live.blocked(facts, command, rule)
        raise Refused(
            f"command refused by rule {rule.id} ({rule.pattern})", reason="command_blocked"
        )

    async def _session(
        self,
        process: asyncssh.SSHServerProcess,
        user: str,
        peer: str | None,
        target: Target,
        command: str | None,
        typed: bytes = b"",
    ) -> None:
        auth = await self._access.authorize(user, target)
        if command:
            await self._refuse_command(auth, command)
        session_id = new_session_id()
        term = process.get_terminal_type()
        width, height, pw, ph = process.get_terminal_size() if term else (80, 24, 0, 0)
        async with await self._machines.connect(auth, session_id) as conn:
            try:
                remote = await conn.create_process(
                    command,
                    term_type=term,
                    term_size=(width, height, pw, ph) if term else None,
                    encoding=None,
                )
            except (OSError, asyncssh.Error) as err:
                msg = f"{auth.machine['hostname']} refused the session: {err}"
                raise Refused(msg, reason="machine_unreachable") from err
            doc = session_doc(
                self._live.owner,
                auth,
                session_id,
                "exec" if command else "shell",
                command,
                peer,
                recording_path(self._state_dir / "bastion", session_id, utcnow()),
            )
            status, signal = await self._relay(
                process, remote, doc, auth, (width, height, term), typed
            )
        if doc["end_reason"] not in (None, "exit"):
            _say(process, f"session ended: {doc['end_reason'].replace('_', ' ')}")
            _exit(process, EXIT_ENDED)
            return
        _exit(process, status if status is not None else EXIT_ENDED, signal)

    async def _relay(
        self,
        process: asyncssh.SSHServerProcess,
        remote: asyncssh.SSHClientProcess,
        doc: SessionDoc,
        auth: Authorized,
        term: tuple[int, int, str | None],
        typed: bytes,
    ) -> tuple[int | None, Any]:
        width, height, term_type = term
        title = f"{doc['user']} as {doc['login']}@{doc['hostname']} ({doc['ip']})"
        cast = CastWriter(
            Path(doc["recording_path"] or ""),
            width,
            height,
            doc["started_at"],
            {"TERM": term_type or ""},
            title,
            record_input=doc["record_input"],
        )
        ending = asyncio.Event()
        live = LiveSession(doc, auth.user["uid"], on_end=lambda _reason: ending.set())

        async def on_blocked(line: str, rule: Any) -> None:
            await self._live.blocked(doc, line, rule)

        pump = Pump(
            process,
            remote,
            cast,
            live,
            check=self._live.blocking_rule if doc["kind"] == "shell" else None,
            on_blocked=on_blocked,
        )
        try:
            await self._live.start(live)
            await _run(pump, typed, process, remote, live, ending)
        finally:
            await cast.close()
            fields = {
                "exit_status": remote.exit_status,
                "bytes_in": pump.bytes_in,
                "bytes_out": pump.bytes_out,
                "recording_size": cast.size,
            }
            try:
                await self._live.finish(live, fields)
            except Exception:
                log.exception("session end not recorded", session_id=doc["_id"])
        return remote.exit_status, remote.exit_signal


async def _run(
    pump: Pump,
    typed: bytes,
    process: asyncssh.SSHServerProcess,
    remote: asyncssh.SSHClientProcess,
    live: LiveSession,
    ending: asyncio.Event,
) -> None:
    """Relay until the machine's side ends, the bastion ends the session, or the user goes."""
    relay = asyncio.ensure_future(pump.run(typed))
    stop = asyncio.ensure_future(ending.wait())
    gone = asyncio.ensure_future(process.wait_closed())
    try:
        await asyncio.wait({relay, stop, gone}, return_when=asyncio.FIRST_COMPLETED)
        if gone.done() and not relay.done():
            live.end("client_closed")
        if not relay.done():
            remote.close()
            relay.cancel()
        failed = (await asyncio.gather(relay, return_exceptions=True))[0]
        if isinstance(failed, Exception):
            # A relay that broke (a recording that cannot be written) ends the session.
            log.error("relay failed", session_id=live.id, error=repr(failed))
            live.end("error")
            remote.close()
        if live.end_reason is None:
            await remote.wait_closed()
    finally:
        for task in (relay, stop, gone):
            task.cancel()
