"""The bastion's two long-lived keys (SSH host key, user CA) and the per-session certificates.

Both keys live under ``<state dir>/bastion`` (0700) as 0600 files, made on the first start and
kept: a new host key would make every client warn, a new CA would lock the bastion out of
every machine. Two bastions starting at once agree on one key: each writes a temporary file
and hard-links it to the final name, which only one link can take.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from libs.common.contracts.bastion import CA_PUBLIC_KEY_FILE

__all__ = ["BastionKeys", "SessionCredentials", "load_keys"]

HOST_KEY = "ssh_host_ed25519_key"
CA_KEY = "user_ca"
# Clocks of machines may lag the bastion's a little.
_BACKDATE_S = 60


@dataclass(frozen=True)
class SessionCredentials:
    """A fresh key pair and its certificate, good for one connection to one machine."""

    key: asyncssh.SSHKey
    cert: asyncssh.SSHCertificate


@dataclass(frozen=True)
class BastionKeys:
    """The host key clients see, and the CA machines trust."""

    host: asyncssh.SSHKey
    ca: asyncssh.SSHKey
    ca_public_path: Path

    def ca_public_line(self) -> str:
        """The CA public key as one OpenSSH line."""
        return self.ca.export_public_key().decode().strip() + " dockvm-bastion-user-ca"

    def sign(self, login: str, key_id: str, ttl_s: int) -> SessionCredentials:
        """A new key with a certificate for ``login`` valid ``ttl_s`` seconds from now."""
        key = asyncssh.generate_private_key("ssh-ed25519")
        now = int(time.time())
        cert = self.ca.generate_user_certificate(
            key,
            key_id,
            principals=[login],
            valid_after=now - _BACKDATE_S,
            valid_before=now + ttl_s,
            # No forwarding of any kind through the machine either.
            permit_x11_forwarding=False,
            permit_agent_forwarding=False,
            permit_port_forwarding=False,
            permit_pty=True,
            permit_user_rc=False,
        )
        return SessionCredentials(key, cert)


def _load_or_create(path: Path) -> asyncssh.SSHKey:
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519")
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key.export_private_key())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another bastion made it first: use theirs
        finally:
            tmp.unlink()
    os.chmod(path, 0o600)
    return asyncssh.read_private_key(path)


def load_keys(state_dir: Path) -> BastionKeys:
    """Read (or make, once) the host key and the user CA; write the CA public key file."""
    directory = state_dir / "bastion"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    host = _load_or_create(directory / HOST_KEY)
    ca = _load_or_create(directory / CA_KEY)
    keys = BastionKeys(host, ca, state_dir / CA_PUBLIC_KEY_FILE)
    pub = keys.ca_public_path
    line = keys.ca_public_line() + "\n"
    if not pub.exists() or pub.read_text() != line:
        tmp = pub.with_name(f".{pub.name}.{os.getpid()}.tmp")
        tmp.write_text(line)
        os.chmod(tmp, 0o644)
        os.replace(tmp, pub)
    return keys
