"""Host commands, with real subprocesses: every one runs under a timeout, in its own process
group, and a command past its timeout (or whose caller is cancelled) dies with all it forked."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from libs.common.errors import DomainError, TransientError
from services.provisioner.adapters.host import (
    HostCommandFailed,
    HostCommands,
    HostCommandTimedOut,
    run,
)
from services.provisioner.adapters.network import OvsNetwork
from services.provisioner.adapters.runtime import ContainerInfo
from services.provisioner.domain import LABEL_GATEWAY, LABEL_IP, LABEL_PREFIX, LABEL_VLAN

# The shell forks a background sleep, writes its own pid (the process group's id: run() makes
# it a session leader) and the sleep's, then waits in a foreground sleep.
FORKING = "sleep 30 & echo $$ $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; sleep 30"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _group_alive(pgid: int) -> list[int]:
    """Pids of the live (not zombie) processes of process group ``pgid``."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start at the last ')'.
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            alive.append(int(entry.name))
    return alive


async def _wait_for(condition, timeout_s: float = 5.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout_s`` passes; return whether it held."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _pids(pidfile: Path) -> tuple[int, int]:
    """(the shell's pid, which is its group's id; its background sleep's pid)."""
    assert await _wait_for(pidfile.exists)
    shell, child = pidfile.read_text().split()
    return int(shell), int(child)


async def test_a_command_returns_its_stdout():
    assert await run("sh", "-c", "echo hello", timeout_s=5) == "hello\n"


async def test_a_failing_command_is_a_domain_error_naming_it():
    with pytest.raises(HostCommandFailed) as caught:
        await run("sh", "-c", "echo broken >&2; exit 3", timeout_s=5)

    assert isinstance(caught.value, DomainError) and caught.value.code == 3
    assert "exited 3: broken" in str(caught.value) and "sh -c" in str(caught.value)


async def test_a_command_past_its_timeout_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "pid"
    started = asyncio.get_running_loop().time()

    with pytest.raises(HostCommandTimedOut) as caught:
        await run("sh", "-c", FORKING.format(pidfile=pidfile), timeout_s=0.5)
    took = asyncio.get_running_loop().time() - started
    pgid, child = await _pids(pidfile)

    assert isinstance(caught.value, TransientError)
    assert "`sh -c sleep 30 &" in str(caught.value) and "within 0.5s" in str(caught.value)
    assert took < 10, "the command was waited for instead of killed"
    assert await _wait_for(lambda: not _alive(child) and not _group_alive(pgid))


async def test_a_cancelled_caller_takes_its_command_down_with_it(tmp_path):
    pidfile = tmp_path / "pid"
    call = asyncio.ensure_future(run("sh", "-c", FORKING.format(pidfile=pidfile), timeout_s=60))
    pgid, child = await _pids(pidfile)
    # The shell and both its sleeps.
    assert await _wait_for(lambda: len(_group_alive(pgid)) == 3), _group_alive(pgid)
    assert child in _group_alive(pgid)

    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    assert await _wait_for(lambda: not _alive(child) and not _group_alive(pgid))


async def test_a_command_that_ends_on_its_own_alarm_is_a_timeout():
    # What ovs-vsctl --timeout does when ovsdb does not answer.
    with pytest.raises(HostCommandTimedOut) as caught:
        await run("sh", "-c", "kill -ALRM $$", check=False, timeout_s=5)

    assert "gave up on its own alarm" in str(caught.value)


async def test_the_shared_timeout_applies_to_every_call(tmp_path):
    host = HostCommands(timeout_s=0.3)

    with pytest.raises(HostCommandTimedOut) as caught:
        await host.run("sleep", "30")

    assert caught.value.timeout_s == 0.3 and caught.value.argv == ("sleep", "30")


class RecordingHost(HostCommands):
    """Records each argv instead of running it; every command answers with no output."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(timeout_s)
        object.__setattr__(self, "calls", [])

    async def run(self, *argv: str, check: bool = True, input: bytes | None = None) -> str:
        self.calls.append(argv)  # type: ignore[attr-defined]
        return ""


async def test_every_ovs_vsctl_call_carries_a_timeout_within_the_command_timeout():
    ovs = OvsNetwork("br-test", command_timeout_s=20)
    host = RecordingHost(20)
    object.__setattr__(ovs, "host", host)
    labels = {LABEL_IP: "10.9.0.10", LABEL_PREFIX: "24", LABEL_VLAN: "9", LABEL_GATEWAY: "10.9.0.1"}
    info = ContainerInfo(
        id="c1", name="dockvm-m1", machine_id="m1", labels=labels, state="running",
        started_at=None, pid=os.getpid(), cpus=1, memory=1 << 30, image="i", network="none",
    )  # fmt: skip

    await ovs.plumb(info)
    await ovs.release("m1", 9)
    vsctl = [argv for argv in host.calls if argv[0] == "ovs-vsctl"]

    assert len(vsctl) == 4  # add-br, del-port, add-port, del-port
    assert all(argv[1] == "--timeout=10" for argv in vsctl), vsctl
