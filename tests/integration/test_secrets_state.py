"""No secret is readable by anyone but root, in the real state dir of the running stack.

The stack (scripts/stack.sh up, which `make test` runs first) makes the state dir and its log, run,
registry and database directories 0700, and writes every secret 0600: the registries' webhook
secret, their configs that carry it, and the admin token once a gateway has started.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

STATE = Path(os.environ.get("DOCKVM_STATE_DIR", "/var/lib/dockvm"))
PRIVATE_DIRS = [".", "log", "run", "registry", "ferretdb"]
# Every file the stack or a service writes that holds a secret, by name.
SECRET_GLOBS = [
    "*.token",
    "*.secret",
    "registry/*.yml",
    "registry/*.secret",
    "registry/haproxy.cfg",
    "ceph/s3.env",
    "ceph/*.keyring",
    "ceph/*/keyring",
]
# What the stack always writes, by registry storage (scripts/registry.sh, scripts/ceph.sh).
ALWAYS = {
    "filesystem": {"webhook.secret", "dc1.yml", "dc2.yml"},
    "ceph": {"webhook.secret", "dc1-r1.yml", "dc2-r1.yml", "http.secret", "s3.env"},
}[os.environ.get("DOCKVM_REGISTRY_STORAGE", "ceph")]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("name", PRIVATE_DIRS)
def test_state_directories_are_private(name):
    path = STATE / name

    assert (oct(_mode(path)), path.stat().st_uid) == (oct(0o700), os.geteuid())


def test_every_secret_file_is_0600():
    files = sorted(f for pattern in SECRET_GLOBS for f in STATE.glob(pattern))

    assert ALWAYS <= {f.name for f in files}
    assert {str(f): oct(_mode(f)) for f in files} == {str(f): oct(0o600) for f in files}


def test_no_log_holds_a_secret():
    secrets = [
        f.read_bytes().strip()
        for p in [*SECRET_GLOBS[:2], "registry/*.secret"]
        for f in STATE.glob(p)
    ]
    logs = {str(log): log.read_bytes() for log in (STATE / "log").glob("*.log")}

    leaks = [(name, s[:6]) for name, text in logs.items() for s in secrets if s in text]

    assert secrets, "the stack writes webhook.secret at least"
    assert leaks == []
