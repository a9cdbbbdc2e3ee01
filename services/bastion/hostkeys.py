"""Which SSH host keys a machine must present to the bastion.

The bastion verifies every machine it connects to (asyncssh ``known_hosts`` for that address):
a machine that presents another key is refused, whatever answers at its address. The keys come
from the platform, never from the machine's network:

1. the machine's summary, when the gateway records its ``host_keys``;
2. else the keys pinned for it (``bastion_host_keys``) at an earlier session;
3. else its host's agent, asked by RPC (``machine.host_keys.get``), which reads them from the
   container's filesystem; the answer is pinned, so a key replaced later inside the machine (or
   an impostor at its address) is refused from then on.

A machine whose keys cannot be had (its agent does not answer, the machine has none yet) is
refused too: the bastion does not connect to a machine it cannot verify.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncssh
import structlog

from libs.common.bus import RpcClient, host_key
from libs.common.contracts.provisioner import MachineHostKeys, MachineHostKeysGet
from libs.common.errors import DomainError, TransientError

from .documents import MachineView
from .domain import Refused
from .store import HostKeyPins

__all__ = ["AskAgent", "HostKeyBook", "agent_asker", "parse_host_keys"]

log = structlog.get_logger("bastion.hostkeys")

# (machine) -> (keys, reason when there are none)
AskAgent = Callable[[MachineView], Awaitable[tuple[list[str], str]]]


def parse_host_keys(lines: list[str]) -> list[asyncssh.SSHKey]:
    """The public keys of OpenSSH lines; a line that is not one is skipped."""
    keys = []
    for line in lines:
        try:
            keys.append(asyncssh.import_public_key(line))
        except (asyncssh.KeyImportError, ValueError):
            log.warning("a recorded host key is not a public key", line=line[:80])
    return keys


def agent_asker(rpc: RpcClient, timeout_s: float) -> AskAgent:
    """Ask a machine's host agent for its host keys (``machine.host_keys.get``)."""

    async def ask(m: MachineView) -> tuple[list[str], str]:
        host = m.get("host")
        if not host:
            return [], "the machine has no host"
        cmd = MachineHostKeysGet(machine_id=m["_id"])
        reply = await rpc.request(cmd, routing_key=host_key(host, cmd.TYPE), timeout=timeout_s)
        if not isinstance(reply, MachineHostKeys):
            return [], f"unexpected answer {reply.TYPE}"
        return list(reply.keys), reply.reason

    return ask


def _unverifiable(m: MachineView, why: str) -> Refused:
    return Refused(
        f"cannot verify {m['hostname']} ({m.get('ip')}): {why}; refused",
        reason="host_key_unknown",
    )


class HostKeyBook:
    """Finds (and pins) the host keys of the machines the bastion connects to."""

    def __init__(self, pins: HostKeyPins, ask: AskAgent) -> None:
        self._pins = pins
        self._ask = ask

    async def keys_for(self, m: MachineView) -> list[asyncssh.SSHKey]:
        """The keys ``m`` must present; :class:`Refused` if there are none to be had."""
        recorded = m.get("host_keys")
        if recorded:
            keys = parse_host_keys(recorded)
        else:
            pinned = await self._pins.pinned(m["_id"])
            if pinned is None:
                pinned = await self._first(m)
            keys = parse_host_keys(pinned)
        if not keys:
            raise _unverifiable(m, "no usable host key is recorded for it")
        return keys

    async def _first(self, m: MachineView) -> list[str]:
        try:
            lines, why = await self._ask(m)
        except TransientError as err:
            raise _unverifiable(m, f"its host {m.get('host')} did not say its host keys") from err
        except DomainError as err:
            raise _unverifiable(m, f"its host {m.get('host')} refused to say: {err}") from err
        if not lines:
            raise _unverifiable(m, f"its host has no host key for it ({why or 'none'})")
        if not parse_host_keys(lines):
            raise _unverifiable(m, "no usable host key is recorded for it")  # and none pinned
        pinned = await self._pins.pin(m["_id"], lines)
        log.info("host keys pinned", machine_id=m["_id"], keys=len(pinned))
        return pinned
