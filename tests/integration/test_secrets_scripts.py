"""The scripts' state dir rules, run on a scratch state dir: private directories (made so, or
fixed when an older version made them 0755), 0600 logs, and an admin token printed into the
gateway's log by an older gateway blanked out in place.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parents[2] / "scripts" / "lib.sh"
PRIVATE = [".", "log", "run", "registry", "ferretdb"]


def _lib(state: Path, script: str) -> None:
    """Run ``script`` in bash with scripts/lib.sh sourced and ``state`` as the state dir."""
    env = {**os.environ, "DOCKVM_STATE_DIR": str(state)}
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", f"source {LIB}; {script}"], env=env, check=True
    )


def _modes(state: Path, names: list[str]) -> dict[str, str]:
    return {n: oct(stat.S_IMODE((state / n).stat().st_mode)) for n in names}


@pytest.mark.parametrize("existing_mode", [None, 0o755])
def test_state_dirs_end_0700(tmp_path, existing_mode):
    state = tmp_path / "state"
    for name in PRIVATE if existing_mode else []:
        (state / name).mkdir(parents=True, exist_ok=True)
        (state / name).chmod(existing_mode)

    _lib(state, "ensure_state_dirs")

    assert _modes(state, PRIVATE) == {n: oct(0o700) for n in PRIVATE}


def test_spawned_process_logs_to_a_0600_file(tmp_path):
    state = tmp_path / "state"

    _lib(state, "ensure_state_dirs; spawn demo true")

    assert _modes(state, ["log/demo.log"]) == {"log/demo.log": oct(0o600)}


def test_a_token_an_old_gateway_logged_is_blanked_in_place(tmp_path):
    state, token = tmp_path / "state", "dvm_0123456789abcdef"
    (state / "log").mkdir(parents=True)
    (state / "admin.token").write_text(token + "\n")
    log = state / "log" / "gateway.log"
    before = f"started\ndockvm admin token (also in x): {token}\nready {token}\n"
    log.write_text(before)
    inode = log.stat().st_ino

    _lib(state, "ensure_state_dirs")
    after = log.read_text()

    assert token not in after
    assert after == before.replace(token, "x" * len(token))
    assert log.stat().st_ino == inode
