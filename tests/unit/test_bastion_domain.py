"""Pure rules of the bastion: targets, grants, command rules, the shell line filter, casts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address

import asyncssh
import pytest

from libs.common.errors import NotFoundError, ValidationFailed
from services.bastion.documents import GrantDoc, MachineView, UserDoc
from services.bastion.domain import (
    BadTarget,
    CastEncoder,
    LineFilter,
    Refused,
    Target,
    compile_rule,
    compile_rules,
    covering_grant,
    grant_alive,
    matching_rule,
    normalise_keys,
    parse_request,
    parse_target,
    resolve_machine,
    split_sftp_path,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
KEY = asyncssh.generate_private_key("ssh-ed25519")
USER: UserDoc = {"_id": "alice", "uid": "u1", "keys": [], "fingerprints": [],
                 "created_at": NOW, "updated_at": NOW}
WEB1: MachineView = {"_id": "m-1", "app": "web", "state": "running", "hostname": "web-1",
                     "ip": "10.0.0.5"}


def grant(**over: object) -> GrantDoc:
    doc = {"_id": "g-1", "user": "alice", "user_uid": "u1", "app": None, "machine_id": "m-1",
           "login": "root", "record_input": False, "created_at": NOW,
           "expires_at": NOW + timedelta(hours=1)}
    doc.update(over)
    return doc  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("root@10.0.0.5", Target("root", "10.0.0.5", IPv4Address("10.0.0.5"))),
        ("10.0.0.5", Target(None, "10.0.0.5", IPv4Address("10.0.0.5"))),
        ("deploy@m-18c2f3a", Target("deploy", "m-18c2f3a", None)),
        ("web-1.example", Target(None, "web-1.example", None)),
    ],
)
def test_a_target_names_a_login_and_a_machine(text: str, want: Target):
    assert parse_target(text) == want


@pytest.mark.parametrize("text", ["root@", "Root!@10.0.0.5", "a/b", "@x", "root@-x", ""])
def test_a_target_in_no_known_form_is_refused(text: str):
    with pytest.raises(BadTarget):
        parse_target(text)


@pytest.mark.parametrize(
    ("command", "target", "rest"),
    [
        (None, None, None),
        ("  ", None, None),
        ("root@10.0.0.5", "root@10.0.0.5", None),
        ("root@10.0.0.5 uptime -p", "root@10.0.0.5", "uptime -p"),
        ("root@10.0.0.5   sh -c 'exit 3'", "root@10.0.0.5", "sh -c 'exit 3'"),
    ],
)
def test_an_exec_request_splits_into_target_and_command(command, target, rest):
    t, r = parse_request(command)
    assert (str(t) if t else None, r) == (target, rest)


def test_an_sftp_path_starts_with_its_target():
    t, path = split_sftp_path("/root@10.0.0.5/etc/hosts")
    assert (str(t), path) == ("root@10.0.0.5", "/etc/hosts")
    assert split_sftp_path("/") == (None, "/")


def test_keys_are_read_and_a_bad_one_names_its_index():
    line = KEY.export_public_key().decode().strip() + " alice@desk"
    keys, prints = normalise_keys([line])
    assert keys == [line]  # the comment stays: it tells keys apart in a listing
    assert prints == [KEY.get_fingerprint()]
    with pytest.raises(ValidationFailed, match=r"^ssh_keys\.1: "):
        normalise_keys([line, "ssh-ed25519 AAAAnotakey"])


@pytest.mark.parametrize(
    ("grants", "login", "reason"),
    [
        ([], "root", "no_grant"),
        ([grant(machine_id="m-2")], "root", "no_grant"),
        ([grant(machine_id=None, app="db")], "root", "no_grant"),
        ([grant()], "admin", "no_grant"),
        ([grant(user_uid="u0")], "root", "no_grant"),
        ([grant(expires_at=NOW)], "root", "grant_expired"),
    ],
)
def test_only_a_live_grant_of_this_user_for_this_machine_and_login_lets_in(grants, login, reason):
    with pytest.raises(Refused) as err:
        covering_grant(USER, grants, WEB1, login, NOW)
    assert err.value.reason == reason


def test_an_app_grant_covers_its_machines_and_a_machine_grant_wins():
    app = grant(_id="g-app", machine_id=None, app="web", expires_at=NOW + timedelta(days=9))
    assert covering_grant(USER, [app], WEB1, None, NOW)["_id"] == "g-app"
    assert covering_grant(USER, [app, grant()], WEB1, "root", NOW)["_id"] == "g-1"


@pytest.mark.parametrize(
    ("g", "user", "why"),
    [
        (grant(), USER, None),
        (None, USER, "revoked"),
        (grant(), None, "user_removed"),
        (grant(user_uid="u0"), USER, "revoked"),
        (grant(expires_at=NOW), USER, "grant_expired"),
    ],
)
def test_a_live_session_ends_when_its_grant_or_user_goes(g, user, why):
    assert grant_alive(g, user, NOW) == why


def test_a_target_resolves_by_ip_then_id_then_hostname():
    other: MachineView = {**WEB1, "_id": "m-2", "ip": "10.0.0.6", "hostname": "web-2"}
    assert resolve_machine(parse_target("10.0.0.6"), [WEB1, other])["_id"] == "m-2"
    assert resolve_machine(parse_target("root@m-1"), [WEB1, other])["_id"] == "m-1"
    assert resolve_machine(parse_target("web-2"), [WEB1, other])["_id"] == "m-2"
    with pytest.raises(NotFoundError):
        resolve_machine(parse_target("web-3"), [WEB1, other])
    twin: MachineView = {**other, "hostname": "web-1"}
    with pytest.raises(BadTarget):
        resolve_machine(parse_target("web-1"), [WEB1, twin])


def test_rules_search_commands_and_a_bad_pattern_is_invalid():
    rules = compile_rules([{"_id": "r-1", "pattern": r"rm\s+-rf\s+/($|\s)", "description": "",
                            "created_at": NOW}])
    assert matching_rule(rules, "sudo rm -rf /").id == "r-1"
    assert matching_rule(rules, "rm -rf /tmp/x") is None
    with pytest.raises(ValidationFailed, match="^pattern: "):
        compile_rule("(")


@pytest.mark.parametrize(
    ("typed", "lines"),
    [
        (b"ls -l\r", ["ls -l"]),
        (b"rbx\x7f\x7foot\r", ["root"]),
        (b"junk\x15reboot\r", ["reboot"]),
        (b"echo a\x1b[Db\r", ["echo ab"]),
        (b"one\rtwo\n", ["one", "two"]),
        (b"rm -rf /tmp\x17/\r", ["rm -rf /"]),
    ],
)
def test_the_line_filter_sees_the_line_enter_runs(typed: bytes, lines: list[str]):
    pieces = LineFilter().feed(typed)
    assert [line for _, line in pieces if line is not None] == lines
    assert b"".join(p for p, _ in pieces) == typed


def test_the_line_filter_keeps_a_line_across_chunks():
    f = LineFilter()
    assert f.feed(b"shut") == [(b"shut", None)]
    assert f.feed(b"down\r") == [(b"down\r", "shutdown")]


def test_a_cast_keeps_utf8_split_across_reads_and_is_ascii():
    enc = CastEncoder()
    data = "été\r\n".encode()
    first, second = enc.event(0.5, "o", data[:1]), enc.event(0.6, "o", data[1:])
    assert first == b""
    assert json.loads(second) == [0.6, "o", "été\r\n"]
    assert second.isascii()
    header = json.loads(CastEncoder.header(80, 24, NOW, {"TERM": "xterm"}, "t"))
    assert (header["version"], header["width"], header["height"]) == (2, 80, 24)
    assert json.loads(CastEncoder.resize(1.0, 132, 40)) == [1.0, "r", "132x40"]


@pytest.mark.parametrize(
    "data",
    [
        b"plain text\r\n",
        b'quote " and \\ back\tslash \x1b[1;31mred\x1b[0m \x7f\r\n',
        b"a bell \x07 and a NUL \x00",
        "caf\u00e9 \u2603\r\n".encode(),
        bytes(range(256)),
    ],
)
def test_a_cast_line_is_what_json_writes(data: bytes):
    line = CastEncoder().event(2.5, "o", data)
    assert line == (json.dumps([2.5, "o", data.decode("utf-8", "replace")]) + "\n").encode()


def test_a_grant_names_an_app_or_a_machine_not_both():
    from pydantic import ValidationError

    from libs.common.contracts.bastion import GrantAdd

    assert GrantAdd(user="alice", machine_id="m-1", ttl_s=60).login == "root"
    for fields in ({}, {"app": "web", "machine_id": "m-1"}):
        with pytest.raises(ValidationError, match="exactly one of app and machine_id"):
            GrantAdd(user="alice", ttl_s=60, **fields)
