"""Pure rules of the bastion: parsing a target, what a grant covers, command rules, the shell
line filter and the asciicast v2 line format. No I/O here.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import asyncssh

from libs.common.errors import DomainError, NotFoundError, ValidationFailed

from .documents import GrantDoc, MachineView, RuleDoc, SessionDoc, UserDoc

__all__ = [
    "CTRL_C",
    "BadTarget",
    "CastEncoder",
    "LineFilter",
    "Refused",
    "Target",
    "compile_rules",
    "covering_grant",
    "normalise_keys",
    "parse_request",
    "parse_target",
    "prunable",
    "split_sftp_path",
]

CTRL_C = b"\x03"
_LOGIN = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


class Refused(DomainError):
    """A login or a target turned away; ``reason`` is the audit code (see ``session.refused``)."""

    reason = "refused"


class BadTarget(Refused):
    """The target is in no form the bastion knows."""

    reason = "bad_target"


@dataclass(frozen=True, slots=True)
class Target:
    """What the user asked for: ``[login@]ip|machine_id|hostname``."""

    login: str | None
    name: str
    ip: IPv4Address | None

    def __str__(self) -> str:
        return f"{self.login}@{self.name}" if self.login else self.name


def parse_target(text: str) -> Target:
    """``root@10.0.0.5``, ``10.0.0.5``, ``root@m-abc``, ``web-1`` → :class:`Target`."""
    login, sep, name = text.rpartition("@")
    if not sep:
        login, name = "", text
    if sep and not _LOGIN.match(login):
        raise BadTarget(f"bad login {login!r} in target {text!r} (want login@machine)")
    if not _NAME.match(name):
        raise BadTarget(
            f"cannot read target {text!r}: give login@IP, login@machine-id or login@hostname"
        )
    try:
        ip: IPv4Address | None = IPv4Address(name)
    except ValueError:
        ip = None
    return Target(login or None, name, ip)


def parse_request(command: str | None) -> tuple[Target | None, str | None]:
    """Split an exec request ``root@IP uptime -p`` into its target and the remote command.

    No command (``ssh alice@bastion``) → ``(None, None)``: the menu. Only a target → a shell.
    """
    if command is None or not command.strip():
        return None, None
    head, _, rest = command.strip().partition(" ")
    rest = rest.strip()
    return parse_target(head), (rest or None)


def split_sftp_path(path: str) -> tuple[Target | None, str]:
    """``/root@10.0.0.5/etc/hosts`` → (target, ``/etc/hosts``); ``/`` → (None, ``/``)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        return None, "/"
    return parse_target(parts[0]), "/" + "/".join(parts[1:])


def normalise_keys(lines: list[str]) -> tuple[list[str], list[str]]:
    """Parse OpenSSH public key lines; return (normalised lines, SHA256 fingerprints).

    Raises :class:`ValidationFailed` naming ``ssh_keys.N`` for a line that is not a key.
    """
    keys, prints = [], []
    for i, line in enumerate(lines):
        try:
            key = asyncssh.import_public_key(line.strip())
        except (asyncssh.KeyImportError, ValueError) as err:
            raise ValidationFailed(f"ssh_keys.{i}: not an OpenSSH public key ({err})") from err
        keys.append(key.export_public_key().decode().strip())
        prints.append(key.get_fingerprint())
    return keys, prints


def user_has_key(user: UserDoc, key: asyncssh.SSHKey) -> bool:
    """True when ``key`` is one of ``user``'s registered keys."""
    return key.get_fingerprint() in user["fingerprints"]


def _covers(grant: GrantDoc, machine: MachineView) -> bool:
    if grant.get("machine_id"):
        return grant["machine_id"] == machine["_id"]
    return grant.get("app") is not None and grant["app"] == machine.get("app")


def covering_grant(
    user: UserDoc,
    grants: list[GrantDoc],
    machine: MachineView,
    login: str | None,
    now: datetime,
) -> GrantDoc:
    """The live grant of ``user`` that lets her in ``machine`` as ``login`` (any login if None).

    Raises :class:`Refused` (``no_grant`` or ``grant_expired``).
    """
    mine = [
        g
        for g in grants
        if g["user"] == user["_id"] and g.get("user_uid") == user["uid"] and _covers(g, machine)
    ]
    fitting = [g for g in mine if login is None or g["login"] == login]
    live = [g for g in fitting if g["expires_at"] > now]
    if live:
        # A machine grant is more specific than an app grant; then the longest-lived one.
        live.sort(key=lambda g: (g.get("machine_id") is None, -g["expires_at"].timestamp()))
        return live[0]
    as_login = f" as {login}" if login else ""
    if fitting:
        msg = f"your grant for {machine['_id']}{as_login} has expired"
        raise Refused(msg, reason="grant_expired")
    raise Refused(f"no grant for {machine['_id']}{as_login}", reason="no_grant")


def grant_alive(grant: GrantDoc | None, user: UserDoc | None, now: datetime) -> str | None:
    """Why a live session must end now (``revoked``, ``grant_expired``, ``user_removed``)."""
    if user is None:
        return "user_removed"
    if grant is None or grant.get("user_uid") != user["uid"]:
        return "revoked"
    if grant["expires_at"] <= now:
        return "grant_expired"
    return None


def resolve_machine(target: Target, machines: list[MachineView]) -> MachineView:
    """The one machine ``target`` names (IP, then id, then hostname); :class:`NotFoundError`."""
    for key in ("ip", "_id", "hostname"):
        found = [m for m in machines if str(m.get(key) or "") == target.name]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise BadTarget(f"{target.name!r} names {len(found)} machines; use the IP or id")
    raise NotFoundError(f"unknown machine {target.name!r}")


# ---- command rules ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A command rule ready to search."""

    id: str
    pattern: str
    regex: re.Pattern[str]


def compile_rule(pattern: str) -> re.Pattern[str]:
    """Compile one rule; :class:`ValidationFailed` for a bad expression."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValidationFailed(f"pattern: not a regular expression ({err})") from err


def compile_rules(rules: list[RuleDoc]) -> list[CompiledRule]:
    """Compile stored rules (a stored rule that no longer compiles is skipped)."""
    out = []
    for r in rules:
        try:
            out.append(CompiledRule(r["_id"], r["pattern"], re.compile(r["pattern"])))
        except re.error:
            continue
    return out


def matching_rule(rules: list[CompiledRule], command: str) -> CompiledRule | None:
    """The first rule whose expression is found in ``command``."""
    for rule in rules:
        if rule.regex.search(command):
            return rule
    return None


@dataclass
class LineFilter:
    """Follows what the user types in a shell to know the line Enter would run.

    Keystrokes go to the machine as typed (so echo, editing and completion still work); on
    Enter the line seen so far is checked, and a matching line is cancelled with Ctrl-C
    instead of run. What the shell really runs can differ from this reconstruction (history,
    completion, aliases, editing keys): see the README.
    """

    line: bytearray = field(default_factory=bytearray)
    _esc: int = 0

    def feed(self, data: bytes) -> list[tuple[bytes, str | None]]:
        """Split ``data`` into pieces to send; a piece paired with a line ends with Enter, and
        the caller checks that line before sending the Enter (or sends Ctrl-C instead)."""
        pieces: list[tuple[bytes, str | None]] = []
        start = 0
        for i, b in enumerate(data):
            if b in (0x0D, 0x0A):
                line = self.line.decode("utf-8", "replace")
                self.line.clear()
                pieces.append((data[start : i + 1], line))
                start = i + 1
            else:
                self._edit(b)
        if start < len(data):
            pieces.append((data[start:], None))
        return pieces

    def _edit(self, b: int) -> None:
        if self._esc:
            # An escape sequence (arrows, function keys) ends with a letter or ``~``.
            self._esc = 0 if (0x40 <= b <= 0x7E and b != 0x5B) else 1
            return
        if b == 0x1B:
            self._esc = 1
        elif b in (0x7F, 0x08):
            del self.line[-1:]
        elif b in (0x15, 0x03):  # Ctrl-U, Ctrl-C
            self.line.clear()
        elif b == 0x17:  # Ctrl-W: the last word
            text = self.line.rstrip()
            cut = text.rfind(b" ")
            del self.line[cut + 1 :]
        elif b >= 0x20 or b == 0x09:
            self.line.append(b)


# ---- asciicast v2 -----------------------------------------------------------------------------


# Control characters other than the common ones (tab, newline, return, escape): rare in what
# people see, and JSON writes them as \uXXXX (the caller's ``json`` path does).
# (As ints: ``int in bytes`` is one memchr; ``bytes in bytes`` goes the long way round first.)
_RARE_CONTROL = tuple(c for c in range(0x20) if c not in b"\t\n\r\x1b")


def _ascii_body(data: bytes) -> bytes | None:
    """``data`` as the inside of a JSON string when it is ASCII and its only control
    characters are the common ones; None otherwise (the caller then uses ``json``).

    Bulk output (``cat`` of a log) is mostly this, and several times cheaper this way: each
    test below is a vectorised scan (``isascii``, ``memchr``), not a loop over the bytes.
    """
    if not data.isascii() or any(c in data for c in _RARE_CONTROL):
        return None
    return (
        data.replace(b"\\", b"\\\\")
        .replace(b'"', b'\\"')
        .replace(b"\n", b"\\n")
        .replace(b"\r", b"\\r")
        .replace(b"\t", b"\\t")
        .replace(b"\x1b", b"\\u001b")
        .replace(b"\x7f", b"\\u007f")
    )


class CastEncoder:
    """Turns a stream of bytes into asciicast v2 event lines (pure ASCII JSON)."""

    def __init__(self) -> None:
        self._decoders = {
            "o": codecs.getincrementaldecoder("utf-8")("replace"),
            "i": codecs.getincrementaldecoder("utf-8")("replace"),
        }

    @staticmethod
    def header(
        width: int, height: int, started: datetime, env: dict[str, str], title: str
    ) -> bytes:
        """The first line of a cast."""
        doc = {
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": int(started.timestamp()),
            "env": env,
            "title": title,
        }
        return (json.dumps(doc, ensure_ascii=True) + "\n").encode()

    def event(self, t: float, kind: str, data: bytes) -> bytes:
        """One ``[t, "o"|"i", text]`` line; a UTF-8 sequence split across calls is kept whole."""
        decoder = self._decoders[kind]
        if not data:
            return b""
        if not decoder.getstate()[0]:
            body = _ascii_body(data)
            if body is not None:
                return b'[%r, "%s", "%s"]\n' % (round(t, 6), kind.encode(), body)
        text = decoder.decode(data)
        if not text:
            return b""
        return (json.dumps([round(t, 6), kind, text], ensure_ascii=True) + "\n").encode()

    @staticmethod
    def resize(t: float, width: int, height: int) -> bytes:
        """One ``[t, "r", "COLSxROWS"]`` line."""
        return (json.dumps([round(t, 6), "r", f"{width}x{height}"]) + "\n").encode()


# ---- retention --------------------------------------------------------------------------------


def prunable(
    sessions: list[SessionDoc], now: datetime, retention_s: float, limit: int, casts: Path
) -> list[SessionDoc]:
    """The ended sessions whose end is more than ``retention_s`` before ``now``, oldest end
    first, at most ``limit``. A live session is never one, however old; nor is one whose cast
    is not under ``casts`` (another bastion's, on another host: that bastion removes it)."""
    cutoff = now - timedelta(seconds=retention_s)
    old = [
        s for s in sessions
        if not s.get("live") and s.get("ended_at") is not None and s["ended_at"] < cutoff
        and (not s.get("recording_path") or Path(s["recording_path"]).is_relative_to(casts))
    ]  # fmt: skip
    old.sort(key=lambda s: (s["ended_at"], s["_id"]))
    return old[: max(limit, 0)]
