"""The bastion with a real sshd in a real machine: exec, PTY shells, recordings, refusals."""

from __future__ import annotations

from libs.common.contracts.bastion import SessionList

from .test_bastion_support import (  # noqa: F401
    Bastion,
    bastion_fixture,
    bastion_state_fixture,
    box_fixture,
)


async def test_exec_runs_the_command_and_returns_its_exit_status(bastion: Bastion):
    await bastion.grant()
    async with await bastion.connect() as conn:
        result = await conn.run(f"{bastion.target()} echo hello; hostname; exit 3")
    assert result.stdout == "hello\nweb-1\n"
    assert result.exit_status == 3
    ended = await bastion.probe.wait_for("session.ended")
    assert ended[0].exit_status == 3 and ended[0].user == "alice"
    listing = await bastion.call(SessionList(user="alice"))
    assert [s.exit_status for s in listing.sessions] == [3]
