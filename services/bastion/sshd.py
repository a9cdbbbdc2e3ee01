"""The bastion's SSH server: who may authenticate, and what a connection may ask for.

Only public keys of registered users are accepted. An unknown user is told so in one banner
line (OpenSSH prints it) before the usual "Permission denied". Port forwarding (both ways),
agent forwarding and X11 are refused. A connection that never authenticated is announced as
``session.refused`` when it closes, with why (``unknown_user`` or ``bad_key``).
"""

from __future__ import annotations

import asyncio

import asyncssh

from libs.common.errors import DomainError

from .domain import Refused
from .keys import BastionKeys
from .relay import Relay
from .service import Access
from .sftp import SftpGate, SftpProxy
from .transport import tune

__all__ = ["listen"]

# AES-GCM only: through ``cryptography`` (AES-NI) it is about 6x cheaper per byte in asyncssh
# than chacha20-poly1305, whose Poly1305 runs partly in Python, and the bastion handles every
# byte twice. OpenSSH prefers chacha20 and then CTR when offered, so neither is; every OpenSSH
# since 6.2 (2013), PuTTY 0.76 and asyncssh offer AES-GCM.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


class _Server(asyncssh.SSHServer):
    """One client connection's authentication and policy."""

    def __init__(self, access: Access, tasks: set[asyncio.Task]) -> None:
        self._access = access
        self._tasks = tasks
        self._peer: str | None = None
        self._user: str | None = None
        self._refusal: DomainError | None = None
        self._authed = False
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """Remember who connects."""
        tune(conn)
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if peer else None

    def _announce(self, err: DomainError, target: str | None = None) -> None:
        task = asyncio.ensure_future(
            self._access.refused(self._user or "", err, target=target, client_addr=self._peer)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        """Announce a login that never got in."""
        if not self._authed and self._user is not None and self._refusal is not None:
            self._announce(self._refusal)

    async def begin_auth(self, username: str) -> bool:
        """Always ask for a key; tell an unknown user so in a banner."""
        self._user = username
        if await self._access.user(username) is None:
            self._refusal = Refused(f"unknown user {username!r}", reason="unknown_user")
            if self._conn is not None:  # asyncssh calls connection_made first
                self._conn.send_auth_banner(f"bastion: unknown user {username!r}\n")
        return True

    def public_key_auth_supported(self) -> bool:
        """Keys are the only way in."""
        return True

    def password_auth_supported(self) -> bool:
        """No passwords."""
        return False

    def kbdint_auth_supported(self) -> bool:
        """No keyboard-interactive."""
        return False

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """True when ``key`` belongs to ``username``."""
        if await self._access.key_allowed(username, key):
            return True
        if self._refusal is None:
            self._refusal = Refused(
                f"key {key.get_fingerprint()} is not one of {username!r}'s", reason="bad_key"
            )
        return False

    def auth_completed(self) -> None:
        """She is in."""
        self._authed = True

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        """Refuse local port forwarding (``ssh -L``, ``-W``, ``-J``)."""
        dest = f"{dest_host}:{dest_port}"
        self._announce(Refused("port forwarding is refused", reason="forwarding_refused"), dest)
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        """Refuse remote port forwarding (``ssh -R``)."""
        err = Refused("remote port forwarding is refused", reason="forwarding_refused")
        self._announce(err, f"{listen_host}:{listen_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        """Refuse forwarding to a UNIX socket."""
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        """Refuse remote UNIX socket forwarding."""
        return False


async def listen(
    host: str,
    port: int,
    keys: BastionKeys,
    access: Access,
    relay: Relay,
    sftp: SftpGate,
    *,
    login_timeout_s: float,
) -> asyncssh.SSHAcceptor:
    """Start the SSH server; stop it with ``close()`` then ``wait_closed()``."""
    tasks: set[asyncio.Task] = set()
    return await asyncssh.listen(
        host,
        port,
        server_factory=lambda: _Server(access, tasks),
        server_host_keys=[keys.host],
        process_factory=relay.handle,
        encoding=None,
        line_editor=False,
        allow_pty=True,
        agent_forwarding=False,
        x11_forwarding=False,
        sftp_factory=lambda chan: SftpProxy(chan, sftp),
        allow_scp=True,
        login_timeout=login_timeout_s,
        encryption_algs=CIPHERS,
        keepalive_interval=30,
    )
