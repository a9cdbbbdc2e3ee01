"""Messages of the bastion service: its admin RPCs (users, grants, sessions, recordings, command
rules, the user CA key) and the audit events it publishes.

Every admin message is an RPC on the queue ``bastion`` (routing keys ``bastion.#``): the caller
sends it with ``reply_to`` and gets one reply model back, or :class:`BastionRejected` with a
stable ``reason`` (``not_found``, ``conflict``, ``invalid``) and the failing ``field``. Writes
are idempotent: ``user.add`` by name (it replaces the keys), ``grant.add`` by ``id`` when the
caller gives one, removals by what they remove (removing twice answers ``not_found``).

Events (routing key = type): ``session.started``, ``session.ended``, ``transfer.done``,
``session.refused`` (a login or a target that was turned away, with why) and
``command.blocked`` (a command rule matched). The gateway's audit log shows them.

The user CA public key is the file :data:`CA_PUBLIC_KEY_FILE` under the state dir (0644) and is
also answered by ``bastion.ca.get``; machines trust it as ``TrustedUserCAKeys``
(:data:`MACHINE_CA_PATH` inside the machine is where the provisioner puts it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from .envelope import Command, Event, register

__all__ = [
    "CA_PUBLIC_KEY_FILE",
    "COMMAND_QUEUE",
    "MACHINE_CA_PATH",
    "MAX_RECORDING_CHUNK",
    "MAX_SESSION_TRANSFERS",
    "BastionRejected",
    "CaGet",
    "CaInfo",
    "CommandBlocked",
    "GrantAdd",
    "GrantInfo",
    "GrantList",
    "GrantListing",
    "GrantRevoke",
    "GrantRevoked",
    "RecordingChunk",
    "RecordingGet",
    "RuleAdd",
    "RuleInfo",
    "RuleList",
    "RuleListing",
    "RuleRemove",
    "RuleRemoved",
    "SessionEnd",
    "SessionEndRequested",
    "SessionEnded",
    "SessionGet",
    "SessionInfo",
    "SessionList",
    "SessionListing",
    "SessionRefused",
    "SessionStarted",
    "SessionTransfer",
    "TransferDone",
    "UserAdd",
    "UserInfo",
    "UserList",
    "UserListing",
    "UserRemove",
    "UserRemoved",
]

COMMAND_QUEUE = "bastion"
"""The queue of the bastion's RPCs; it is bound to ``bastion.#``."""

CA_PUBLIC_KEY_FILE = "bastion/user_ca.pub"
"""The user CA public key, relative to ``DOCKVM_STATE_DIR`` (one OpenSSH line, 0644)."""

MACHINE_CA_PATH = "/etc/ssh/dockvm_user_ca.pub"
"""Where a machine keeps the bastion's user CA key (sshd: ``TrustedUserCAKeys`` of this path)."""

MAX_RECORDING_CHUNK = 1 << 20
"""The largest ``limit`` a ``bastion.recording.get`` may ask for, in bytes."""

UserName = str
_NAME = r"^[a-z][a-z0-9._-]{0,31}$"
_LOGIN = r"^[a-z_][a-z0-9_-]{0,31}$"
SessionKind = Literal["exec", "shell", "sftp", "menu"]
EndReason = Literal[
    "exit",  # the remote command or shell ended
    "client_closed",  # the user's client went away
    "revoked",  # the grant was revoked
    "grant_expired",
    "user_removed",
    "ended_by_admin",  # bastion.session.end
    "idle",
    "max_duration",
    "machine_unreachable",
    "bastion_shutdown",
    "error",
]


# ---- users ----------------------------------------------------------------------------------


@register
class UserAdd(Command):
    """Register a person (or replace her keys): ``ssh_keys`` are OpenSSH public key lines."""

    TYPE = "bastion.user.add"
    name: UserName = Field(pattern=_NAME)
    ssh_keys: list[str] = Field(min_length=1, max_length=32)


@register
class UserList(Command):
    """Query: every registered user."""

    TYPE = "bastion.user.list"


@register
class UserRemove(Command):
    """Remove a user: her grants go, her live sessions end within 5 s."""

    TYPE = "bastion.user.remove"
    name: UserName


@register
class UserInfo(Event):
    """Reply to ``bastion.user.add``; also an item of a listing. Keys as stored (normalised)."""

    TYPE = "bastion.user"
    name: UserName
    ssh_keys: list[str]
    fingerprints: list[str]
    created_at: datetime
    updated_at: datetime


@register
class UserListing(Event):
    """Reply to ``bastion.user.list``."""

    TYPE = "bastion.user.listing"
    users: list[UserInfo]


@register
class UserRemoved(Event):
    """Reply to ``bastion.user.remove``."""

    TYPE = "bastion.user.removed"
    name: UserName
    grants_revoked: int = 0
    sessions_ended: int = 0


# ---- grants ---------------------------------------------------------------------------------


@register
class GrantAdd(Command):
    """Let ``user`` log in as ``login`` on one machine, or on every machine of an app (also the
    ones created later), for ``ttl_s`` seconds. ``record_input`` also records her keystrokes."""

    TYPE = "bastion.grant.add"
    id: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    user: UserName
    app: str | None = Field(default=None, min_length=1, max_length=64)
    machine_id: str | None = Field(default=None, min_length=1, max_length=64)
    login: str = Field(default="root", pattern=_LOGIN)
    ttl_s: int = Field(ge=1, le=366 * 24 * 3600)
    record_input: bool = False

    @model_validator(mode="after")
    def _app_or_machine(self) -> GrantAdd:
        if (self.app is None) == (self.machine_id is None):
            raise ValueError("give exactly one of app and machine_id")
        return self


@register
class GrantList(Command):
    """Query: grants, optionally of one user; expired ones only when ``include_expired``."""

    TYPE = "bastion.grant.list"
    user: UserName | None = None
    include_expired: bool = False


@register
class GrantRevoke(Command):
    """Revoke a grant: the sessions it let in end within 5 s."""

    TYPE = "bastion.grant.revoke"
    id: str


@register
class GrantInfo(Event):
    """Reply to ``bastion.grant.add``; also an item of a listing."""

    TYPE = "bastion.grant"
    id: str
    user: UserName
    app: str | None = None
    machine_id: str | None = None
    login: str
    record_input: bool = False
    created_at: datetime
    expires_at: datetime
    active: bool = True


@register
class GrantListing(Event):
    """Reply to ``bastion.grant.list``."""

    TYPE = "bastion.grant.listing"
    grants: list[GrantInfo]


@register
class GrantRevoked(Event):
    """Reply to ``bastion.grant.revoke``."""

    TYPE = "bastion.grant.revoked"
    id: str
    sessions_ended: int = 0


# ---- sessions and recordings ----------------------------------------------------------------


@register
class SessionList(Command):
    """Query: sessions (newest first) filtered by user, machine IP and start time range.

    The gateway maps ``?from=`` to ``since`` and ``?to=`` to ``until`` (both on ``started_at``).
    """

    TYPE = "bastion.session.list"
    user: UserName | None = None
    ip: str | None = None
    machine_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    live_only: bool = False
    limit: int = Field(default=100, ge=1, le=1000)


@register
class SessionGet(Command):
    """Query: one session."""

    TYPE = "bastion.session.get"
    id: str


@register
class SessionEnd(Command):
    """End a live session (``ended_by_admin``); a session already over is answered as is."""

    TYPE = "bastion.session.end"
    id: str


MAX_SESSION_TRANSFERS = 200


class SessionTransfer(BaseModel):
    """One file an sftp (or scp) session moved: its path on the machine, the bytes, which way."""

    path: str
    size: int
    direction: Literal["upload", "download"]
    at: datetime


@register
class SessionInfo(Event):
    """One session: reply to ``bastion.session.get``, and an item of a listing."""

    TYPE = "bastion.session"
    id: str
    user: UserName
    login: str
    machine_id: str | None = None
    app: str | None = None
    ip: str | None = None
    hostname: str | None = None
    kind: SessionKind
    command: str | None = None
    client_addr: str | None = None
    grant_id: str | None = None
    record_input: bool = False
    started_at: datetime
    ended_at: datetime | None = None
    live: bool
    exit_status: int | None = None
    end_reason: EndReason | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    recording_path: str | None = None
    recording_size: int = 0
    # An sftp session's files (it has no terminal recording): the first MAX_SESSION_TRANSFERS,
    # and how many there were in all.
    transfers: list[SessionTransfer] = Field(default_factory=list)
    transfer_count: int = 0


@register
class SessionListing(Event):
    """Reply to ``bastion.session.list``."""

    TYPE = "bastion.session.listing"
    sessions: list[SessionInfo]


@register
class SessionEndRequested(Event):
    """Reply to ``bastion.session.end``: ``was_live`` tells whether there was anything to end."""

    TYPE = "bastion.session.end_requested"
    id: str
    was_live: bool


@register
class RecordingGet(Command):
    """Query: a slice of a session's asciicast v2 file, from byte ``offset``.

    The cast is pure ASCII (JSON lines with escaped non-ASCII), so a chunk is a ``str`` whose
    length in characters is its length in bytes. Read from 0, then from ``next_offset`` until
    ``eof``. A live session's cast grows: ``eof`` is then false with ``data`` possibly empty.
    """

    TYPE = "bastion.recording.get"
    session_id: str
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=MAX_RECORDING_CHUNK, ge=1, le=MAX_RECORDING_CHUNK)


@register
class RecordingChunk(Event):
    """Reply to ``bastion.recording.get``. ``path`` is the file on the bastion's host."""

    TYPE = "bastion.recording.chunk"
    session_id: str
    path: str
    offset: int
    next_offset: int
    size: int
    data: str
    eof: bool
    live: bool


# ---- command rules --------------------------------------------------------------------------


@register
class RuleAdd(Command):
    """Add a command rule: a Python regular expression searched in exec commands and in each
    line typed in a shell; a match is refused (exec) or not sent (shell)."""

    TYPE = "bastion.rule.add"
    pattern: str = Field(min_length=1, max_length=1000)
    description: str = Field(default="", max_length=200)


@register
class RuleList(Command):
    """Query: the command rules."""

    TYPE = "bastion.rule.list"


@register
class RuleRemove(Command):
    """Remove a command rule."""

    TYPE = "bastion.rule.remove"
    id: str


@register
class RuleInfo(Event):
    """Reply to ``bastion.rule.add``; also an item of a listing."""

    TYPE = "bastion.rule"
    id: str
    pattern: str
    description: str = ""
    created_at: datetime


@register
class RuleListing(Event):
    """Reply to ``bastion.rule.list``."""

    TYPE = "bastion.rule.listing"
    rules: list[RuleInfo]


@register
class RuleRemoved(Event):
    """Reply to ``bastion.rule.remove``."""

    TYPE = "bastion.rule.removed"
    id: str


# ---- the user CA ----------------------------------------------------------------------------


@register
class CaGet(Command):
    """Query: the user CA public key machines must trust."""

    TYPE = "bastion.ca.get"


@register
class CaInfo(Event):
    """Reply to ``bastion.ca.get``: one OpenSSH public key line, and the file it is in."""

    TYPE = "bastion.ca"
    public_key: str
    path: str
    fingerprint: str


# ---- refusals -------------------------------------------------------------------------------


@register
class BastionRejected(Event):
    """Reply to any bastion RPC that was refused; nothing changed."""

    TYPE = "bastion.rejected"
    reason: Literal["not_found", "conflict", "invalid"]
    detail: str = ""
    field: str | None = None


# ---- audit events ---------------------------------------------------------------------------


class _SessionFacts(Event):
    session_id: str
    user: UserName
    login: str
    machine_id: str | None = None
    app: str | None = None
    ip: str | None = None
    kind: SessionKind
    command: str | None = None
    client_addr: str | None = None
    grant_id: str | None = None


@register
class SessionStarted(_SessionFacts):
    """A user is connected to a machine through the bastion, and recorded."""

    TYPE = "session.started"
    started_at: datetime


@register
class SessionEnded(_SessionFacts):
    """A session is over; its recording is complete."""

    TYPE = "session.ended"
    started_at: datetime
    ended_at: datetime
    exit_status: int | None = None
    end_reason: EndReason
    bytes_in: int = 0
    bytes_out: int = 0
    recording_path: str | None = None


@register
class TransferDone(Event):
    """A file went through the bastion's sftp (scp uses sftp too)."""

    TYPE = "transfer.done"
    session_id: str
    user: UserName
    login: str
    machine_id: str | None = None
    ip: str | None = None
    path: str
    size: int
    direction: Literal["upload", "download"]
    at: datetime


@register
class SessionRefused(Event):
    """A login or a target was turned away (``reason``: ``unknown_user``, ``bad_key``,
    ``no_grant``, ``grant_expired``, ``unknown_machine``, ``bad_target``,
    ``forwarding_refused``, ``machine_unreachable``, ``host_key_mismatch``: the machine
    presented another host key than the platform's, ``host_key_unknown``: none to check)."""

    TYPE = "session.refused"
    user: str
    reason: str
    detail: str = ""
    target: str | None = None
    machine_id: str | None = None
    client_addr: str | None = None
    at: datetime


@register
class CommandBlocked(Event):
    """A command rule matched: the exec was refused, or the shell line was not sent."""

    TYPE = "command.blocked"
    session_id: str | None = None
    user: UserName
    login: str
    machine_id: str | None = None
    ip: str | None = None
    command: str
    rule_id: str
    pattern: str
    kind: SessionKind
    at: datetime
