"""A gateway started on a fresh state dir writes its admin token to a 0600 file, and only there.

Its stdout is a log file (scripts/services.sh sends it to $DOCKVM_STATE_DIR/log/gateway.log), so
the token must not appear in it: the log shows the file's path instead.
"""

from __future__ import annotations

import stat
from pathlib import Path


def _mode(path: Path) -> str:
    return oct(stat.S_IMODE(path.stat().st_mode))


async def test_first_start_logs_the_token_path_never_the_token(start_service, service_env):
    state = Path(service_env["DOCKVM_STATE_DIR"])
    assert not state.exists()

    gateway = await start_service("gateway")
    token_file = state / "admin.token"
    token = token_file.read_text().strip()
    assert gateway.log_path is not None
    log = gateway.log_path.read_text()

    assert token.startswith("dvm_")
    assert (_mode(token_file), _mode(state)) == (oct(0o600), oct(0o700))
    assert token not in log
    assert f"dockvm admin token written to {token_file}" in log
