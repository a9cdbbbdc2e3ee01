"""The shapes of the bastion's stored documents, and of the gateway's machine summaries it reads.

How each collection copes with FerretDB v1 is in :mod:`services.bastion.store`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NotRequired, TypedDict

__all__ = ["GrantDoc", "MachineView", "RuleDoc", "SessionDoc", "UserDoc"]


class UserDoc(TypedDict):
    """A person allowed to log in (``bastion_users``, ``_id`` = name)."""

    _id: str
    # Minted when the name is first added, kept when keys are replaced: a grant names the uid
    # too, so a grant written for a removed user never lets a later user of that name in.
    uid: str
    keys: list[str]
    fingerprints: list[str]
    created_at: datetime
    updated_at: datetime


class GrantDoc(TypedDict):
    """A grant (``bastion_grants``, ``_id`` = id); revoking deletes it."""

    _id: str
    user: str
    user_uid: str
    app: str | None
    machine_id: str | None
    login: str
    record_input: bool
    created_at: datetime
    expires_at: datetime


class RuleDoc(TypedDict):
    """A command rule (``bastion_rules``, ``_id`` = id)."""

    _id: str
    pattern: str
    description: str
    created_at: datetime


class SessionDoc(TypedDict):
    """A session and its recording's metadata (``bastion_sessions``, ``_id`` = session id).

    Written only by the bastion process in ``owner`` (inserted at start, set at end).
    """

    _id: str
    owner: str
    user: str
    login: str
    machine_id: str | None
    app: str | None
    ip: str | None
    hostname: str | None
    kind: str
    command: str | None
    client_addr: str | None
    grant_id: str | None
    record_input: bool
    started_at: datetime
    ended_at: datetime | None
    live: bool
    exit_status: int | None
    end_reason: str | None
    bytes_in: int
    bytes_out: int
    recording_path: str | None
    recording_size: NotRequired[int]
    # sftp sessions: the first MAX_SESSION_TRANSFERS files ({path, size, direction, at}), and
    # how many in all (saved at most once a second while live, and at the end).
    transfers: NotRequired[list[dict[str, Any]]]
    transfer_count: NotRequired[int]


class MachineView(TypedDict):
    """What the bastion reads of a gateway ``machine_summaries`` document (read-only)."""

    _id: str
    app: str
    state: str
    hostname: str
    ip: str | None
    host: NotRequired[str | None]
    # The host public keys its sshd serves (OpenSSH lines), when the gateway records them.
    host_keys: NotRequired[list[str]]
