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
SECRET_GLOBS = ["*.token", "*.secret", "registry/*.yml"]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("name", PRIVATE_DIRS)
def test_state_directories_are_private(name):
    path = STATE / name

    assert (oct(_mode(path)), path.stat().st_uid) == (oct(0o700), os.geteuid())


def test_every_secret_file_is_0600():
    files = sorted(f for pattern in SECRET_GLOBS for f in STATE.glob(pattern))

    # webhook.secret and the two registry configs at least: the stack always writes them.
    assert {"webhook.secret", "dc1.yml", "dc2.yml"} <= {f.name for f in files}
    assert {str(f): oct(_mode(f)) for f in files} == {str(f): oct(0o600) for f in files}


def test_no_log_holds_a_secret():
    secrets = [f.read_bytes().strip() for p in SECRET_GLOBS[:2] for f in STATE.glob(p)]
    logs = {str(log): log.read_bytes() for log in (STATE / "log").glob("*.log")}

    leaks = [(name, s[:6]) for name, text in logs.items() for s in secrets if s in text]

    assert secrets, "the stack writes webhook.secret at least"
    assert leaks == []
