"""The bastion with a real sshd in a real machine: exec, PTY shells, recordings, refusals."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import asyncssh
import pytest

from libs.common.bus import RpcClient
from libs.common.contracts.bastion import (
    BastionRejected,
    CaGet,
    GrantAdd,
    GrantList,
    GrantRevoke,
    RecordingGet,
    RuleAdd,
    RuleList,
    RuleRemove,
    SessionEnd,
    SessionGet,
    SessionInfo,
    SessionList,
    UserAdd,
    UserList,
    UserRemove,
)
from tests.support.stack import free_port

from .test_bastion_support import (  # noqa: F401
    ALICE,
    MALLORY,
    Bastion,
    Box,
    bastion_fixture,
    bastion_state_fixture,
    box_fixture,
    summary,
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
    async with aiohttp.ClientSession() as http, http.get(f"{bastion.proc.url}/metrics") as r:
        metrics = await r.text()
    assert 'dockvm_bastion_sessions_ended_total{kind="exec",reason="exit"} 1.0' in metrics


async def _read_until(stream: asyncssh.SSHReader[bytes], needle: bytes, seen: bytearray,
                      timeout: float = 15) -> None:
    """Read ``stream`` into ``seen`` until ``needle`` is in it."""
    async with asyncio.timeout(timeout):
        while needle not in seen:
            data = await stream.read(4096)
            assert data, f"EOF before {needle!r}; got {bytes(seen)!r}"
            seen += data


async def _cast(bastion: Bastion, session_id: str) -> list[Any]:
    """A session's recording through the RPC, chunk by chunk, parsed."""
    text, offset = "", 0
    while True:
        chunk = await bastion.call(RecordingGet(session_id=session_id, offset=offset, limit=4096))
        assert chunk.TYPE == "bastion.recording.chunk", chunk
        text += chunk.data
        offset = chunk.next_offset
        if chunk.eof:
            return [json.loads(line) for line in text.splitlines()]


async def test_a_pty_shell_follows_resizes_and_its_recording_replays_the_bytes_seen(
    bastion: Bastion,
):
    await bastion.grant(record_input=True)
    seen = bytearray()
    async with await bastion.connect() as conn:
        proc = await conn.create_process(
            bastion.target(), term_type="xterm", term_size=(80, 24), encoding=None
        )
        proc.stdin.write(b"stty size; tty\n")
        await _read_until(proc.stdout, b"24 80", seen)
        await _read_until(proc.stdout, b"/dev/pts/", seen)
        proc.change_terminal_size(132, 40)
        proc.stdin.write(b"stty size\n")
        await _read_until(proc.stdout, b"40 132", seen)
        proc.stdin.write("echo \u00e9t\u00e9 done\n".encode())
        await _read_until(proc.stdout, "\u00e9t\u00e9 done\r\n".encode(), seen)
        proc.stdin.write(b"exit 5\n")
        async with asyncio.timeout(15):
            while data := await proc.stdout.read(4096):
                seen += data
            await proc.wait_closed()
        assert proc.exit_status == 5
    ended = (await bastion.probe.wait_for("session.ended"))[0]
    cast = await _cast(bastion, ended.session_id)
    header, events = cast[0], cast[1:]
    assert (header["version"], header["width"], header["height"]) == (2, 80, 24)
    assert "".join(e[2] for e in events if e[1] == "o").encode() == bytes(seen)
    assert ["132x40"] == [e[2] for e in events if e[1] == "r"]
    assert "exit 5\n" in "".join(e[2] for e in events if e[1] == "i")
    assert [e[0] for e in events] == sorted(e[0] for e in events)
    info = await bastion.call(SessionGet(id=ended.session_id))
    assert (info.kind, info.live, info.exit_status, info.end_reason) == ("shell", False, 5, "exit")
    assert info.bytes_out == len(seen) and info.recording_size > len(seen)


async def test_the_real_openssh_client_runs_a_command_through_the_bastion(
    bastion: Bastion, tmp_path: Path
):
    await bastion.grant()
    key = tmp_path / "alice"
    key.write_bytes(ALICE.export_private_key())
    key.chmod(0o600)
    ssh = await asyncio.create_subprocess_exec(
        "ssh", "-i", str(key), "-p", str(bastion.ssh_port), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR", "alice@127.0.0.1",
        bastion.target(), "cat /etc/hostname; exit 7",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(ssh.communicate(), 30)
    assert (out, ssh.returncode) == (b"web-1\n", 7), err


async def test_the_real_openssh_client_is_told_an_unknown_user_in_one_line(
    bastion: Bastion, tmp_path: Path
):
    key = tmp_path / "bob"
    key.write_bytes(MALLORY.export_private_key())
    key.chmod(0o600)
    ssh = await asyncio.create_subprocess_exec(
        "ssh", "-i", str(key), "-p", str(bastion.ssh_port), "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "IdentitiesOnly=yes", "bob@127.0.0.1", bastion.target(), "true",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # at OpenSSH's default LogLevel (INFO), which shows banners
    out, err = await asyncio.wait_for(ssh.communicate(), 30)
    assert (out, ssh.returncode) == (b"", 255)
    assert "bastion: unknown user 'bob'" in err.decode().splitlines()


async def test_no_target_shows_the_menu_and_the_pick_opens_a_shell(bastion: Bastion):
    await bastion.grant()
    seen = bytearray()
    async with await bastion.connect() as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(100, 30), encoding=None)
        await _read_until(proc.stdout, b"(empty: quit): ", seen)
        assert bastion.box.ip.encode() in seen and b"web-1" in seen
        proc.stdin.write(b"1\r")
        proc.stdin.write(b"echo $((6*7)); exit\n")
        await _read_until(proc.stdout, b"42", seen)
        async with asyncio.timeout(15):
            await proc.wait_closed()
        assert proc.exit_status == 0


@pytest.mark.parametrize(
    ("setup", "command", "reason"),
    [
        ("none", "root@{ip} true", "no_grant"),
        ("expired", "root@{ip} true", "grant_expired"),
        ("other_app", "root@{ip} true", "no_grant"),
        ("other_login", "admin@{ip} true", "no_grant"),
        ("mine", "root@10.254.254.254 true", "unknown_machine"),
        ("mine", "root@not/a/target true", "bad_target"),
        ("mine", "Root!@{ip} true", "bad_target"),
        ("impostor", "root@{ip} true", "host_key_mismatch"),
        ("unverifiable", "root@{ip} true", "host_key_unknown"),
    ],
)
async def test_a_login_without_a_live_grant_is_refused_with_one_line_and_audited(
    bastion: Bastion, setup: str, command: str, reason: str
):
    if setup == "expired":
        grant = await bastion.grant(ttl_s=1)
        await _until_expired(bastion, grant.id)
    elif setup == "other_app":
        await bastion.call(GrantAdd(user="alice", app="db", ttl_s=600))
    elif setup == "mine":
        await bastion.grant()
    elif setup == "impostor":  # the platform knows another key than the one the box serves
        await bastion.grant()
        other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
        await summary(bastion.db, bastion.box, host_keys=[other.strip()])
    elif setup == "unverifiable":  # no key recorded, and no agent on its host answers
        await bastion.grant()
        await summary(bastion.db, bastion.box, host_keys=[])
    async with await bastion.connect() as conn:
        result = await conn.run(command.format(ip=bastion.box.ip))
    assert result.exit_status == 1
    assert result.stdout == "" and result.stderr.startswith("bastion: ")
    assert result.stderr.count("\n") == 1, result.stderr
    refused = await bastion.probe.wait_for("session.refused")
    assert (refused[0].user, refused[0].reason) == ("alice", reason)
    assert (await bastion.call(SessionList(user="alice"))).sessions == []


async def _until_expired(bastion: Bastion, grant_id: str) -> None:
    async with asyncio.timeout(10):
        while True:
            listing = await bastion.call(GrantList(user="alice", include_expired=True))
            if not [g for g in listing.grants if g.id == grant_id and g.active]:
                return
            await asyncio.sleep(0.2)


async def test_a_wrong_key_or_an_unknown_user_is_refused_and_audited(bastion: Bastion):
    await bastion.grant()
    with pytest.raises(asyncssh.PermissionDenied):
        await bastion.connect(key=MALLORY)
    with pytest.raises(asyncssh.PermissionDenied):
        await bastion.connect(user="bob")
    refused = await bastion.probe.wait_for("session.refused", count=2)
    assert sorted((r.user, r.reason) for r in refused) == [
        ("alice", "bad_key"), ("bob", "unknown_user")
    ]


async def test_the_users_own_key_does_not_open_the_machine_directly(bastion: Bastion):
    await bastion.grant()
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncssh.connect(bastion.box.ip, username="root", client_keys=[ALICE],
                               known_hosts=None, agent_path=None, connect_timeout=10)
    async with await bastion.connect() as conn:
        assert (await conn.run(f"{bastion.target()} true")).exit_status == 0


async def test_port_forwarding_is_refused(bastion: Bastion):
    await bastion.grant()
    async with await bastion.connect() as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection(bastion.box.ip, 22)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.start_server(lambda *_: None, "127.0.0.1", 0)
    refused = await bastion.probe.wait_for("session.refused", count=2)
    assert [(r.reason, r.target) for r in refused] == [
        ("forwarding_refused", f"{bastion.box.ip}:22"), ("forwarding_refused", "127.0.0.1:0")
    ]


@pytest.mark.parametrize("how", ["revoke", "remove_user", "end_session"])
async def test_revoking_during_a_live_session_ends_it_within_5s(bastion: Bastion, how: str):
    grant = await bastion.grant()
    async with await bastion.connect() as conn:
        proc = await conn.create_process(bastion.target(), term_type="xterm", encoding=None)
        seen = bytearray()
        proc.stdin.write(b"echo re''ady\n")
        await _read_until(proc.stdout, b"ready", seen)
        started = (await bastion.probe.wait_for("session.started"))[0]
        if how == "revoke":
            reply = await bastion.call(GrantRevoke(id=grant.id))
            reason = "revoked"
        elif how == "remove_user":
            reply = await bastion.call(UserRemove(name="alice"))
            reason = "user_removed"
        else:
            reply = await bastion.call(SessionEnd(id=started.session_id))
            reason = "ended_by_admin"
        assert reply.TYPE != "bastion.rejected", reply
        async with asyncio.timeout(5):
            await proc.wait_closed()
        assert proc.exit_status == 255
    ended = (await bastion.probe.wait_for("session.ended"))[0]
    assert ended.end_reason == reason


async def test_a_blocked_command_is_refused_in_exec_and_in_a_shell_and_audited(
    bastion: Bastion,
):
    await bastion.grant()
    rule = await bastion.call(RuleAdd(pattern=r"^\s*(shutdown|reboot)\b", description="power"))
    async with await bastion.connect() as conn:
        result = await conn.run(f"{bastion.target()} shutdown -h now")
        assert result.exit_status == 126
        assert result.stderr == f"bastion: command refused by rule {rule.id} ({rule.pattern})\n"
        proc = await conn.create_process(bastion.target(), term_type="xterm", encoding=None)
        seen = bytearray()
        proc.stdin.write(b"echo re''ady\r")  # the prompt is there, as for a person
        await _read_until(proc.stdout, b"ready", seen)
        proc.stdin.write(b"reboot\r")
        await _read_until(proc.stdout, b"blocked by command rule", seen)
        proc.stdin.write(b"echo still $((40+2))\r")
        await _read_until(proc.stdout, b"still 42", seen)
        proc.stdin.write(b"exit\r")
        async with asyncio.timeout(15):
            await proc.wait_closed()
    blocked = await bastion.probe.wait_for("command.blocked", count=2)
    assert [(b.kind, b.command.strip(), b.rule_id) for b in blocked] == [
        ("exec", "shutdown -h now", rule.id), ("shell", "reboot", rule.id)
    ]
    assert (await bastion.call(RuleRemove(id=rule.id))).TYPE == "bastion.rule.removed"
    assert (await bastion.call(RuleList())).rules == []


async def test_twenty_concurrent_sessions(bastion: Bastion):
    await bastion.grant()

    async def one(i: int) -> tuple[str, int | None]:
        async with await bastion.connect() as conn:
            r = await conn.run(f"{bastion.target()} echo {i}; exit {i % 3}")
            return r.stdout or str(r.stderr), r.exit_status

    results = await asyncio.gather(*(one(i) for i in range(20)))
    assert results == [(f"{i}\n", i % 3) for i in range(20)]
    await bastion.probe.wait_for("session.ended", count=20)


async def test_a_bastion_killed_mid_session_leaves_a_readable_recording(
    bastion: Bastion, start_service: Any
):
    await bastion.grant()
    conn = await bastion.connect()
    proc = await conn.create_process(bastion.target(), term_type="xterm", encoding=None)
    seen = bytearray()
    proc.stdin.write(b"echo before-the-crash\n")
    await _read_until(proc.stdout, b"before-the-crash\r\n", seen)
    started = (await bastion.probe.wait_for("session.started"))[0]
    info = await bastion.call(SessionGet(id=started.session_id))
    # Events are written in batches at most FLUSH_S (0.5 s) after they happen, with no help
    # from the session: the output reaches the file while the session goes on (the deadline is
    # loose for a loaded host), and then the bastion dies.
    async with asyncio.timeout(5):
        while b"before-the-crash" not in Path(info.recording_path).read_bytes():
            await asyncio.sleep(0.05)
    bastion.proc.kill()
    await bastion.proc.proc.wait()
    conn.abort()
    lines = Path(info.recording_path).read_text().splitlines()
    events = [json.loads(line) for line in lines[1:]]
    assert json.loads(lines[0])["version"] == 2
    # Everything the client read is there (and perhaps the prompt that followed it).
    assert "".join(e[2] for e in events if e[1] == "o").encode().startswith(bytes(seen))
    await start_service("bastion", env=bastion.proc.env)
    after = await bastion.call(SessionGet(id=started.session_id))
    assert (after.live, after.end_reason) == (False, "error")
    assert after.ended_at is not None and after.ended_at >= after.started_at


async def test_sftp_puts_and_gets_files_on_the_machine_named_in_the_path_and_audits_them(
    bastion: Bastion,
):
    await bastion.grant()
    payload = bytes(range(256)) * 4096  # 1 MiB
    async with await bastion.connect() as conn, conn.start_sftp_client() as sftp:
        assert f"root@{bastion.box.ip}" in await sftp.listdir("/")
        base = f"/root@{bastion.box.ip}/tmp"
        async with sftp.open(f"{base}/up.bin", "wb") as f:
            await f.write(payload)
        assert (await sftp.stat(f"{base}/up.bin")).size == len(payload)
        async with sftp.open(f"{base}/up.bin", "rb") as f:
            assert await f.read() == payload
        assert await sftp.realpath(f"root@{bastion.box.ip}/tmp/../etc") == (
            f"/root@{bastion.box.ip}/etc"
        )
        with pytest.raises(asyncssh.SFTPError, match="unknown machine"):
            await sftp.listdir("/root@10.254.254.254/")
    async with await bastion.connect() as conn:
        check = await conn.run(f"{bastion.target()} sha256sum < /tmp/up.bin")
    assert check.stdout.split()[0] == hashlib.sha256(payload).hexdigest()
    done = await bastion.probe.wait_for("transfer.done", count=2)
    assert [(t.path, t.size, t.direction) for t in done] == [
        ("/tmp/up.bin", len(payload), "upload"), ("/tmp/up.bin", len(payload), "download")
    ]
    ended = await bastion.probe.wait_for("session.ended", where=lambda m: m.kind == "sftp")
    assert (ended[0].bytes_in, ended[0].bytes_out) == (len(payload), len(payload))
    # Its record is its transfer log; it has no terminal recording, and says so.
    info = await bastion.call(SessionGet(id=ended[0].session_id))
    assert (info.kind, info.transfer_count, info.recording_path) == ("sftp", 2, None)
    assert [(t.path, t.size, t.direction) for t in info.transfers] == [
        ("/tmp/up.bin", len(payload), "upload"), ("/tmp/up.bin", len(payload), "download")
    ]
    cast = await bastion.call(RecordingGet(session_id=info.id))
    assert isinstance(cast, BastionRejected) and cast.reason == "not_found"
    assert "sftp sessions have no terminal recording" in cast.detail


async def test_the_real_scp_copies_through_the_bastion(bastion: Bastion, tmp_path: Path):
    await bastion.grant()
    key = tmp_path / "alice"
    key.write_bytes(ALICE.export_private_key())
    key.chmod(0o600)
    src = tmp_path / "hello.txt"
    src.write_text("hello through the bastion\n")
    opts = ["-i", str(key), "-P", str(bastion.ssh_port), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "IdentitiesOnly=yes", "-o", "LogLevel=ERROR"]
    remote = f"alice@127.0.0.1:root@{bastion.box.ip}/tmp/hello.txt"
    for args in ([str(src), remote], [remote, str(tmp_path / "back.txt")]):
        scp = await asyncio.create_subprocess_exec(
            "scp", *opts, *args, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(scp.communicate(), 30)
        assert scp.returncode == 0, err.decode()
    assert (tmp_path / "back.txt").read_text() == "hello through the bastion\n"


async def test_the_admin_rpcs_answer_and_refuse_bad_input_by_field(bastion: Bastion):
    bob_key = MALLORY.export_public_key().decode().strip() + " bob@desk"
    bob = await bastion.call(UserAdd(name="bob", ssh_keys=[bob_key]))
    assert (bob.name, bob.ssh_keys, bob.fingerprints) == (
        "bob", [bob_key], [MALLORY.get_fingerprint()]
    )
    assert [u.name for u in (await bastion.call(UserList())).users] == ["alice", "bob"]
    bad = await bastion.call(UserAdd(name="carol", ssh_keys=[bob_key, "ssh-rsa AAAAnot"]))
    assert (bad.TYPE, bad.reason, bad.field) == ("bastion.rejected", "invalid", "ssh_keys.1")
    nobody = await bastion.call(GrantAdd(user="carol", app="web", ttl_s=60))
    assert (nobody.reason, nobody.field) == ("not_found", None)
    regex = await bastion.call(RuleAdd(pattern="(unclosed"))
    assert (regex.reason, regex.field) == ("invalid", "pattern")
    grant = await bastion.grant(user="bob", app="web", machine_id=None, login="admin")
    listed = await bastion.call(GrantList(user="bob"))
    assert [(g.id, g.app, g.login, g.active) for g in listed.grants] == [
        (grant.id, "web", "admin", True)
    ]
    removed = await bastion.call(UserRemove(name="bob"))
    assert (removed.grants_revoked, removed.sessions_ended) == (1, 0)
    assert (await bastion.call(UserRemove(name="bob"))).reason == "not_found"
    assert (await bastion.call(GrantList(include_expired=True))).grants == []
    ca = await bastion.call(CaGet())
    ca_file = bastion.state / "bastion" / "user_ca.pub"
    assert ca.public_key + "\n" == ca_file.read_text() and ca.path == str(ca_file)
    assert ca_file.stat().st_mode & 0o777 == 0o644
    assert (bastion.state / "bastion" / "user_ca").stat().st_mode & 0o777 == 0o600
    assert (await bastion.call(SessionGet(id="s-none"))).reason == "not_found"


async def test_idle_and_too_long_sessions_end(
    start_service: Any, box: Box, bastion_state: Path, amqp: Any, mongo_db: Any,
    probe_factory: Any,
):
    ssh_port = free_port()
    probe = await probe_factory("session.#")
    await start_service("bastion", env={
        "DOCKVM_STATE_DIR": str(bastion_state), "DOCKVM_BASTION_SSH_PORT": str(ssh_port),
        "DOCKVM_BASTION_IDLE_TIMEOUT_S": "1", "DOCKVM_BASTION_MAX_SESSION_S": "3",
    })
    rpc = RpcClient(amqp, source="tests")
    await summary(mongo_db, box)
    b = Bastion(None, ssh_port, rpc, probe, mongo_db, box, bastion_state)  # type: ignore[arg-type]
    await b.call(UserAdd(name="alice", ssh_keys=[ALICE.export_public_key().decode()]))
    await b.grant()
    async with await b.connect() as conn:
        quiet = await conn.run(f"{b.target()} sleep 30")
        busy = await conn.run(f"{b.target()} while :; do echo .; sleep 0.3; done")
    assert (quiet.exit_status, quiet.stderr) == (255, "bastion: session ended: idle\n")
    assert (busy.exit_status, busy.stderr) == (255, "bastion: session ended: max duration\n")
    ended = await probe.wait_for("session.ended", count=2)
    assert [e.end_reason for e in ended] == ["idle", "max_duration"]
    await rpc.close()


async def test_revoking_ends_a_live_sftp_session_within_5s(bastion: Bastion):
    grant = await bastion.grant()
    async with await bastion.connect() as conn:
        sftp = await conn.start_sftp_client()
        assert "hostname" in await sftp.listdir(f"/root@{bastion.box.ip}/etc")
        await bastion.call(GrantRevoke(id=grant.id))
        async with asyncio.timeout(5):
            await sftp.wait_closed()
        with pytest.raises((asyncssh.SFTPError, asyncssh.Error, OSError)):
            await sftp.listdir(f"/root@{bastion.box.ip}/etc")
    ended = await bastion.probe.wait_for("session.ended")
    assert (ended[0].kind, ended[0].end_reason) == ("sftp", "revoked")


async def test_sessions_past_the_retention_are_removed_with_their_casts_live_ones_kept(
    start_service: Any, box: Box, bastion_state: Path, amqp: Any, mongo_db: Any,
    probe_factory: Any,
):
    ssh_port = free_port()
    probe = await probe_factory("session.#")
    await start_service("bastion", env={
        "DOCKVM_STATE_DIR": str(bastion_state), "DOCKVM_BASTION_SSH_PORT": str(ssh_port),
        "DOCKVM_BASTION_SESSION_RETENTION_S": "1", "DOCKVM_BASTION_PRUNE_INTERVAL_S": "0.5",
    })
    rpc = RpcClient(amqp, source="tests")
    await summary(mongo_db, box)
    b = Bastion(None, ssh_port, rpc, probe, mongo_db, box, bastion_state)  # type: ignore[arg-type]
    await b.call(UserAdd(name="alice", ssh_keys=[ALICE.export_public_key().decode()]))
    await b.grant()
    async with await b.connect() as conn:
        shell = await conn.create_process(b.target(), term_type="xterm", encoding=None)
        done = await conn.run(f"{b.target()} echo gone-soon")
        ended = (await probe.wait_for("session.ended"))[0]
        cast = Path(ended.recording_path)
        assert done.stdout == "gone-soon\n" and cast.exists()
        async with asyncio.timeout(30):
            while isinstance(await b.call(SessionGet(id=ended.session_id)), SessionInfo):
                await asyncio.sleep(0.2)
        live = [s for s in (await b.call(SessionList(user="alice"))).sessions if s.live]
        shell.stdin.write(b"exit\n")
    await rpc.close()
    assert not cast.exists()
    assert [s.kind for s in live] == ["shell"]  # older than the retention, but live: kept
