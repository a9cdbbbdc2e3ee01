"""A machine's SSH host public keys, for the bastion to verify the machine it connects to.

The bastion asks (``machine.host_keys.get``, an RPC to the machine's host) before its first
session to a machine and pins the answer. The keys are read from the running container's
filesystem through the host's kernel (``/proc/<pid>/root/etc/ssh/ssh_host_*_key.pub``), the files
sshd serves, not over the machine's network where an impostor could answer. dockvm-init makes
them at the first start (and a migration carries them over), so they stay the machine's own.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from libs.common.contracts.provisioner import MachineHostKeys, MachineHostKeysGet

from .adapters.runtime import ContainerRuntime

__all__ = ["HostKeyReader", "read_host_keys"]

_MAX_KEY_FILE = 16 << 10


def read_host_keys(root: Path) -> list[str]:
    """The ``ssh_host_*_key.pub`` lines under ``root``/etc/ssh, ed25519 first."""
    keys = []
    for path in sorted((root / "etc" / "ssh").glob("ssh_host_*_key.pub")):
        if path.is_file() and path.stat().st_size <= _MAX_KEY_FILE:
            line = path.read_text(errors="replace").strip()
            if line.count(" ") >= 1:
                keys.append(" ".join(line.split()[:2]))  # type and key, without the comment
    return sorted(keys, key=lambda k: not k.startswith("ssh-ed25519 "))


class HostKeyReader:
    """Answers ``machine.host_keys.get`` for the machines of this host."""

    def __init__(self, runtime: ContainerRuntime, host: str, proc: Path = Path("/proc")) -> None:
        self._runtime = runtime
        self._host = host
        self._proc = proc

    async def get(self, cmd: MachineHostKeysGet) -> MachineHostKeys:
        """The keys of a running machine of this host (``reason`` says why there are none)."""
        info = await self._runtime.find(cmd.machine_id)
        reason = ""
        keys: list[str] = []
        if info is None:
            reason = "not_here"
        elif not info.running or info.pid <= 0:
            reason = "not_running"
        else:
            root = self._proc / str(info.pid) / "root"
            try:
                keys = await asyncio.to_thread(read_host_keys, root)
            except OSError as err:
                reason = f"unreadable: {err.strerror or err}"
            else:
                reason = "" if keys else "no_keys"
        return MachineHostKeys(machine_id=cmd.machine_id, host=self._host, keys=keys, reason=reason)
