"""A machine's side of the bastion: the user CA its sshd trusts, and the one source its SSH
port answers.

- The user CA: the bastion's CA public key (one OpenSSH line, a file on this host named by
  ``DOCKVM_BASTION_CA_PUBKEY``; when that file is not here, as the bastion answers
  ``bastion.ca.get``) is copied per machine and bound read-only onto the machine's
  ``TrustedUserCAKeys`` file. The copy is written in place (a bind mount follows the inode), so
  a key that appears or changes later (the bastion started after the agent, a new CA) reaches
  running machines at the next reconcile. An absent key is an empty file: no certificate is
  trusted, and the agent says so once.
- The SSH guard: an nftables table (``inet dockvm_ssh``) in the machine's network namespace
  accepts port 22 only from the bastion's source addresses (and the machine itself, on
  loopback) and resets every other attempt
  (a reset, not a drop: a refused client is told at once instead of timing out). It is written
  from the host with ``nsenter -t <pid> -n nft -f -`` in one nft transaction that replaces the
  table, so re-applying is idempotent and never leaves a half rule set. The machine cannot lift
  it: it runs without CAP_NET_ADMIN. Docker gives a container a fresh namespace on every start,
  which comes without the table, so the agent applies it after its own starts, on the engine's
  start events and at every reconcile; a container whose (pid, start time) it already guarded
  still holds its table and is skipped. Between a start and the rule (milliseconds, the time
  of one nft call) sshd may answer anyone; it then still trusts only the bastion's CA.
  A ``direct_ssh`` (break-glass) machine gets no table: its point is to be reachable when the
  bastion is not. Nor does a machine made before the bastion (it trusts its old keys, not the
  CA): recreate it to bring it under.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from ipaddress import IPv4Network
from pathlib import Path
from typing import Protocol

import asyncssh
import structlog

from libs.common.contracts import Message
from libs.common.contracts.bastion import CaGet, CaInfo
from libs.common.errors import TransientError

from ..domain import LABEL_DIRECT_SSH, LABEL_GATEWAY
from .host import HostCommands
from .runtime import ContainerInfo

__all__ = [
    "NFT_TABLE",
    "NftSshGuard",
    "SshGuard",
    "UserCaKey",
    "allowed_sources",
    "fetch_user_ca",
    "parse_sources",
    "ssh_ruleset",
]

log = structlog.get_logger("provisioner.bastion")

NFT_TABLE = "dockvm_ssh"
SSH_PORT = 22


def parse_sources(value: str | Iterable[str]) -> tuple[IPv4Network, ...]:
    """``"10.0.0.1, 10.1.0.0/24"`` (or a list) as networks; a bad item is refused by name."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            out.append(IPv4Network(item, strict=False))
        except ValueError as err:
            raise ValueError(f"{item!r} is not an IPv4 address or network") from err
    return tuple(out)


def allowed_sources(
    info: ContainerInfo, configured: tuple[IPv4Network, ...]
) -> tuple[IPv4Network, ...] | None:
    """Where a machine's SSH may come from: the configured bastion source, else the machine's
    network gateway (the host, where a host-local bastion connects from); None for a
    break-glass (``direct_ssh``) machine, and for one made before the bastion (no label: it
    trusts its old keys, not the CA, and a rule would lock its users out), both left open."""
    if info.labels.get(LABEL_DIRECT_SSH) != "false":
        return None
    if configured:
        return configured
    gateway = info.labels.get(LABEL_GATEWAY)
    return (IPv4Network(f"{gateway}/32"),) if gateway else ()


def ssh_ruleset(sources: Iterable[IPv4Network]) -> str:
    """One nft transaction that (re)places the table: port 22 from ``sources`` only."""
    nets = sorted({str(n) for n in sources})
    accept = f"\t\ttcp dport {SSH_PORT} ip saddr {{ {', '.join(nets)} }} accept\n" if nets else ""
    # "table; delete table; table {...}": the delete never fails, and nft applies all or none.
    return (
        f"table inet {NFT_TABLE}\n"
        f"delete table inet {NFT_TABLE}\n"
        f"table inet {NFT_TABLE} {{\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority 0; policy accept;\n"
        # The machine's own ssh to itself (localhost) is not a way in from outside.
        '\t\tiifname "lo" accept\n'
        f"{accept}"
        f"\t\ttcp dport {SSH_PORT} reject with tcp reset\n"
        "\t}\n"
        "}\n"
    )


class Rpc(Protocol):
    """Port: request/reply over the bus."""

    async def request(self, msg: Message, *, timeout: float = 10.0) -> Message:
        """Send ``msg`` and return the reply."""
        ...


class SshGuard(Protocol):
    """Port: keep a machine's SSH port answering only the bastion."""

    async def apply(self, info: ContainerInfo) -> bool:
        """Guard the running container (no-op if already guarded); True if rules were written."""
        ...

    def forget(self, machine_id: str) -> None:
        """The machine is gone: drop what is remembered of it."""
        ...


@dataclass
class NftSshGuard:
    """The SSH guard as an nftables table written into the machine's network namespace."""

    sources: tuple[IPv4Network, ...] = ()
    commands: HostCommands = field(default_factory=HostCommands)
    # machine_id -> the (pid, start) of the container whose namespace holds our table.
    _guarded: dict[str, tuple[int, datetime | None]] = field(default_factory=dict)

    async def apply(self, info: ContainerInfo) -> bool:
        """Write the table into the container's namespace unless that namespace has it."""
        if not info.running or info.pid <= 0:
            return False
        allowed = allowed_sources(info, self.sources)
        if allowed is None:
            return False
        marker = (info.pid, info.started_at)
        if self._guarded.get(info.machine_id) == marker:
            return False
        if not allowed:
            log.warning("no bastion source known: SSH refused from everywhere",
                        machine_id=info.machine_id)  # fmt: skip
        argv = ("nsenter", "-t", str(info.pid), "-n", "nft", "-f", "-")
        await self.commands.run(*argv, input=ssh_ruleset(allowed).encode())
        self._guarded[info.machine_id] = marker
        return True

    def forget(self, machine_id: str) -> None:
        """Forget the machine's guarded namespace."""
        self._guarded.pop(machine_id, None)


class UserCaKey:
    """The bastion's user CA public key, read from its file when that file changes, or (when
    the bastion runs on another host, so the file is not here) as the bastion answered it."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._seen: tuple[float, int] | None = None
        self._key = ""
        self._answered = ""
        self._warned = False

    @property
    def from_file(self) -> bool:
        """Whether the key comes from the file on this host."""
        return bool(self._key)

    def current(self) -> str:
        """The key line (with a newline), or "" while there is none; re-read on a change."""
        if self.path is not None:
            try:
                st = self.path.stat()
            except OSError:
                self._absent("absent")
            else:
                if self._seen != (st.st_mtime, st.st_size):
                    self._seen = (st.st_mtime, st.st_size)
                    self._key = self._read()
        return self._key or self._answered

    def adopt(self, line: str) -> bool:
        """Take the key the bastion answered (``bastion.ca.get``); True if it is new."""
        try:
            key = asyncssh.import_public_key(line.strip())
        except (ValueError, asyncssh.KeyImportError):
            log.warning("the bastion answered a CA key that is not an OpenSSH public key")
            return False
        new = line.strip() + "\n"
        if new == self._answered:
            return False
        self._answered = new
        log.info("bastion user CA key from the bastion", fingerprint=key.get_fingerprint())
        return True

    def _read(self) -> str:
        if self.path is None:  # no file on this host: only the bastion's answer counts
            return self._key
        try:
            line = self.path.read_text().strip()
            key = asyncssh.import_public_key(line)
        except (OSError, UnicodeDecodeError, ValueError, asyncssh.KeyImportError) as err:
            # Keep the last good key: a half-written file must not drop the trust of every
            # machine; a CA that was never good leaves none.
            self._absent(f"unreadable: {err}")
            return self._key
        self._warned = False
        log.info("bastion user CA key loaded", path=str(self.path),
                 fingerprint=key.get_fingerprint())  # fmt: skip
        return line + "\n"

    def _absent(self, why: str) -> None:
        if not self._warned and not self._answered:
            log.warning("bastion user CA key unavailable: machines trust no certificate",
                        path=str(self.path), why=why)  # fmt: skip
            self._warned = True


async def fetch_user_ca(user_ca: UserCaKey, rpc: Rpc, timeout_s: float = 5.0) -> bool:
    """Without the CA file on this host, ask the bastion for its key (``bastion.ca.get``);
    True if a new key was adopted. A bastion that does not answer is tried again next time."""
    if user_ca.from_file:
        return False
    try:
        reply = await rpc.request(CaGet(), timeout=timeout_s)
    except TransientError as err:
        log.debug("the bastion did not answer bastion.ca.get", error=str(err))
        return False
    return isinstance(reply, CaInfo) and user_ca.adopt(reply.public_key)
