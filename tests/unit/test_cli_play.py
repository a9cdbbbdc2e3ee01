"""``dockvm session play``: a real cast the bastion recorded (a PTY shell: a command, a pause, a
command that prints twice 0.7 s apart, a resize, exit) replayed on a fake clock, so its timing is
checked exactly and no test sleeps; and the bastion commands of the CLI on a fake transport."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cli.main as main
from cli.bastion import parse_ttl
from cli.cast import CastError, Frame, parse_cast, play

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bastion"
CAST = (FIXTURES / "shell.cast").read_text()
# The bytes the user's terminal received during that session.
SEEN = (FIXTURES / "shell.seen").read_bytes()


class Clock:
    """A clock that moves only when slept on (or when a write is made to take time)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _replay(speed: float = 1.0, idle_limit: float | None = None, write_cost: float = 0.0):
    """Play the cast on a fake clock: (when each output was written, since start; total)."""
    clock = Clock()
    start = clock.now
    written: list[tuple[float, str]] = []

    def write(data: str) -> None:
        written.append((clock.now - start, data))
        clock.now += write_cost

    total = play(parse_cast(CAST).frames, write, speed=speed, idle_limit=idle_limit,
                 clock=clock, sleep=clock.sleep)  # fmt: skip
    return written, total, clock


def test_the_real_cast_parses_and_its_output_is_the_bytes_the_user_saw():
    cast = parse_cast(CAST)

    assert (cast.header["version"], cast.header["width"], cast.header["height"]) == (2, 80, 24)
    assert {f.code for f in cast.frames} == {"o", "i", "r"}
    assert "".join(f.data for f in cast.frames if f.code == "o").encode() == SEEN
    assert not cast.truncated
    assert cast.duration == pytest.approx(2.299548)


@pytest.mark.parametrize("speed", [1.0, 2.0, 0.5])
def test_each_output_is_written_at_its_time_over_speed(speed):
    written, total, _ = _replay(speed)

    outputs = [f for f in parse_cast(CAST).frames if f.code == "o"]
    assert [d for _, d in written] == [f.data for f in outputs]
    assert [t for t, _ in written] == pytest.approx([f.at / speed for f in outputs])
    assert total == pytest.approx(parse_cast(CAST).duration / speed)


def test_time_spent_writing_is_absorbed_not_added_up():
    # Each write takes 5 ms: the replay still ends when the cast does, not 7 writes later.
    written, total, _ = _replay(write_cost=0.005)

    outputs = [f for f in parse_cast(CAST).frames if f.code == "o"]
    assert written[-1][0] == pytest.approx(outputs[-1].at)
    assert total == pytest.approx(outputs[-1].at + 0.005)


def test_idle_limit_caps_every_pause():
    written, total, clock = _replay(idle_limit=0.3)

    # No pause between two events is longer (two outputs may have an input between them).
    assert max(clock.sleeps) <= 0.3 + 1e-9
    assert [d for _, d in written] == [f.data for f in parse_cast(CAST).frames if f.code == "o"]
    # The 1.2 s pause after `uname` and the 0.7 s one inside the second command are cut.
    assert total < parse_cast(CAST).duration - 1.0


def test_a_cast_cut_short_mid_line_plays_what_was_written():
    cut = CAST[: CAST.rindex("\n[") + 20]  # the last event's line, half written (a crash)

    cast = parse_cast(cut)

    assert cast.truncated
    assert len(cast.frames) == len(parse_cast(CAST).frames) - 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ('{"version": 1, "width": 80}\n', "not an asciicast v2"),
        ("hello\n", "not an asciicast header"),
        ('{"version": 2}\n[0.1, "o", "a"]\nnot json\n[0.3, "o", "b"]\n', "line 3"),
    ],
)
def test_what_is_not_a_cast_is_refused_with_why(text, message):
    with pytest.raises(CastError, match=message):
        parse_cast(text)


def test_speed_must_be_positive():
    with pytest.raises(ValueError, match="speed"):
        play([Frame(0.1, "o", "x")], lambda _: None, speed=0)


@pytest.mark.parametrize(
    ("value", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("8h", 28800), ("2d", 172800)]
)
def test_ttl_takes_a_unit(value, seconds):
    assert parse_ttl(value) == seconds


# ---- the commands on a fake transport ---------------------------------------------------------


class FakeTransport:
    """Answers from a table of (method, path) -> (status, body); records the requests."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {}
        self.requests: list[tuple[str, str, Any, Any]] = []

    async def __aenter__(self) -> FakeTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def request(self, method, path, *, json=None, params=None, headers=None):
        self.requests.append((method, path, json, params))
        return self.answers[(method, path)]


@pytest.fixture
def fake(monkeypatch) -> FakeTransport:
    t = FakeTransport()
    monkeypatch.setattr(main, "make_transport", lambda config: t)
    monkeypatch.setenv("DOCKVM_TOKEN", "t")
    return t


def _run(*args: str):
    return CliRunner().invoke(main.app, list(args))


def test_play_writes_the_recorded_output_to_the_terminal(fake):
    fake.answers[("GET", "/v1/sessions/s1/recording")] = (200, CAST)

    res = _run("session", "play", "s1", "--speed", "1000")

    assert res.exit_code == 0, res.output
    assert SEEN in res.stdout_bytes


def test_play_of_an_unknown_session_says_so_and_exits_1(fake):
    problem = {"title": "Not Found", "status": 404, "detail": "no session s9"}
    fake.answers[("GET", "/v1/sessions/s9/recording")] = (404, problem)

    res = _run("session", "play", "s9")

    assert res.exit_code == 1
    assert "no session s9" in res.output


def test_grant_add_sends_one_target_and_the_ttl_in_seconds(fake):
    fake.answers[("POST", "/v1/grants")] = (201, {
        "id": "g1", "user": "alice", "app": "web", "machine_id": None, "login": "root",
        "expires_at": "2026-01-01T08:00:00Z"})  # fmt: skip

    res = _run("grant", "add", "alice", "--app", "web", "--ttl", "8h")
    both = _run("grant", "add", "alice", "--app", "web", "--machine", "m1")

    assert res.exit_code == 0, res.output
    assert fake.requests == [("POST", "/v1/grants", {
        "user": "alice", "login": "root", "ttl_s": 28800, "record_input": False, "app": "web",
    }, None)]  # fmt: skip
    assert both.exit_code == 2


def test_user_add_reads_key_files(fake, tmp_path):
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b"
    (tmp_path / "id.pub").write_text(key + "\n")
    fake.answers[("POST", "/v1/users")] = (201, {"name": "alice", "fingerprints": ["SHA256:x"]})

    res = _run("user", "add", "alice", "--key-file", str(tmp_path / "id.pub"))

    assert res.exit_code == 0, res.output
    assert fake.requests[0][2] == {"name": "alice", "ssh_keys": [key]}


def test_machine_create_asks_for_direct_ssh_only_when_told(fake):
    accepted = {"machines": [{"id": "m-1", "state": "requested", "links": {}}]}
    fake.answers[("POST", "/v1/machines")] = (202, accepted)
    base = ["machine", "create", "--app", "web", "--image", "img", "--cpus", "1", "--memory",
            "512m", "--disk", "1g", "--dc", "dc1", "--vlan", "233", "--no-wait"]  # fmt: skip

    plain = _run(*base)
    direct = _run(*base, "--direct-ssh", "--ssh-key", "ssh-ed25519 AAAA a@b")

    assert (plain.exit_code, direct.exit_code) == (0, 0)
    bodies = [body for _, _, body, _ in fake.requests]
    assert "direct_ssh" not in bodies[0]
    assert (bodies[1]["direct_ssh"], bodies[1]["ssh_keys"]) == (True, ["ssh-ed25519 AAAA a@b"])
