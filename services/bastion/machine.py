"""Reaching a machine: the bastion's own SSH connection to it, with a certificate made for one
session, and the record of a session that starts.

The machine's host key is checked against the keys the platform knows for it (see
:mod:`.hostkeys`): a machine that presents another one is refused with one line.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Awaitable
from pathlib import Path

import asyncssh

from libs.common.clock import utcnow

from .documents import SessionDoc
from .domain import Refused
from .hostkeys import HostKeyBook
from .keys import BastionKeys, SessionCredentials
from .service import Authorized
from .transport import tune

__all__ = ["MachineConnector", "new_session_id", "session_doc"]

_ATTEMPTS = 4
_WINDOW = 8 << 20
_MAX_PACKET = 256 << 10
# Cheapest first (see services.bastion.sshd.CIPHERS); the rest for an sshd that lacks GCM.
_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes256-ctr",
)


def new_session_id() -> str:
    """A session id that sorts by start time."""
    return f"s-{time.time_ns() // 1000:x}{secrets.token_hex(3)}"


def session_doc(
    owner: str,
    auth: Authorized,
    session_id: str,
    kind: str,
    command: str | None,
    peer: str | None,
    recording: Path | None,
) -> SessionDoc:
    """The record of a session that starts now."""
    m = auth.machine
    return {
        "_id": session_id,
        "owner": owner,
        "user": auth.user["_id"],
        "login": auth.login,
        "machine_id": m["_id"],
        "app": m.get("app"),
        "ip": m.get("ip"),
        "hostname": m.get("hostname"),
        "kind": kind,
        "command": command,
        "client_addr": peer,
        "grant_id": auth.grant["_id"],
        "record_input": bool(auth.grant["record_input"]),
        "started_at": utcnow(),
        "ended_at": None,
        "live": True,
        "exit_status": None,
        "end_reason": None,
        "bytes_in": 0,
        "bytes_out": 0,
        "recording_path": str(recording) if recording else None,
    }


class _Client(asyncssh.SSHClient):
    """The bastion's side of one connection to a machine."""

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        """Before the key exchange: the bastion's transport changes (see :mod:`.transport`)."""
        tune(conn)


def _unreachable(auth: Authorized, err: BaseException) -> Refused:
    m = auth.machine
    detail = getattr(err, "reason", None) or str(err) or type(err).__name__
    return Refused(
        f"cannot reach {m['hostname']} ({m['ip']}) as {auth.login}: {detail}",
        reason="machine_unreachable",
    )


class MachineConnector:
    """Opens the bastion's SSH connection to a machine for one session."""

    def __init__(
        self, keys: BastionKeys, cert_ttl_s: int, connect_timeout_s: float, book: HostKeyBook
    ) -> None:
        self._keys = keys
        self._book = book
        self._ttl = cert_ttl_s
        self._timeout = connect_timeout_s

    async def connect(self, auth: Authorized, session_id: str) -> asyncssh.SSHClientConnection:
        """Log in ``auth.machine`` as ``auth.login``; :class:`Refused` if it cannot be reached."""
        m = auth.machine
        if not m.get("ip"):
            raise Refused(f"machine {m['_id']} has no IP yet", reason="machine_unreachable")
        host_keys = await self._book.keys_for(m)
        creds = self._keys.sign(auth.login, f"bastion:{auth.user['_id']}:{session_id}", self._ttl)
        # sshd drops handshakes beyond MaxStartups (10 by default) at random: a burst of
        # sessions to one machine gets some connections reset, worth a few quick retries.
        attempt = 0
        while True:
            try:
                opening = self._open(m["ip"], auth.login, creds, host_keys)
                return await asyncio.wait_for(opening, self._timeout)
            except asyncssh.HostKeyNotVerifiable as err:
                raise Refused(
                    f"{m['hostname']} ({m['ip']}) presented a host key that is not its own; "
                    "refused (its key was replaced, or another host answers at its address)",
                    reason="host_key_mismatch",
                ) from err
            except (ConnectionResetError, asyncssh.ConnectionLost) as err:
                attempt += 1
                if attempt == _ATTEMPTS:
                    raise _unreachable(auth, err) from err
                await asyncio.sleep(0.1 * 2**attempt + random.random() * 0.1)
            except (OSError, asyncssh.Error, TimeoutError) as err:
                raise _unreachable(auth, err) from err

    def _open(
        self, ip: str, login: str, creds: SessionCredentials, host_keys: list[asyncssh.SSHKey]
    ) -> Awaitable[asyncssh.SSHClientConnection]:
        return asyncssh.connect(
            str(ip),
            22,
            username=login,
            client_factory=_Client,
            client_keys=[(creds.key, creds.cert)],
            known_hosts=(host_keys, [], []),
            agent_path=None,
            preferred_auth="publickey",
            connect_timeout=self._timeout,
            encryption_algs=_CIPHERS,
            # A deeper window and bigger packets from sshd: fewer round trips and less work
            # per byte on the bastion's side of bulk output.
            window=_WINDOW,
            max_pktsize=_MAX_PACKET,
        )
