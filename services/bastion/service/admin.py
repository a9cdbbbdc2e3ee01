"""Use cases of the bastion's admins: users, grants, command rules, and reading sessions.

Removing a user or revoking a grant ends the live sessions it let in at once (in this process)
and, for any other way a grant disappears, the watchdog of :mod:`.live` within a second.
"""

from __future__ import annotations

import secrets
import uuid
from datetime import timedelta
from pathlib import Path

from libs.common.clock import utcnow
from libs.common.errors import ConflictError, NotFoundError, ValidationFailed

from ..documents import GrantDoc, RuleDoc, SessionDoc, UserDoc
from ..domain import compile_rule, normalise_keys
from ..recording import read_chunk
from ..store import BastionStore, SessionFilter
from .live import LiveSessions

__all__ = ["Admin", "RecordingSlice"]


class RecordingSlice:
    """A piece of a session's cast."""

    def __init__(self, path: str, offset: int, data: bytes, size: int, live: bool) -> None:
        self.path, self.offset, self.data, self.size, self.live = path, offset, data, size, live

    @property
    def next_offset(self) -> int:
        """Where the next read starts."""
        return self.offset + len(self.data)

    @property
    def eof(self) -> bool:
        """True when the whole cast has been read and nothing more will come."""
        return not self.live and self.next_offset >= self.size


class Admin:
    """What the bastion's RPCs do."""

    def __init__(self, store: BastionStore, live: LiveSessions) -> None:
        self._store = store
        self._live = live

    # ---- users ------------------------------------------------------------------------------

    async def add_user(self, name: str, ssh_keys: list[str]) -> UserDoc:
        """Register ``name`` with ``ssh_keys`` (replacing her keys if she exists)."""
        keys, prints = normalise_keys(ssh_keys)
        now = utcnow()
        old = await self._store.get_user(name)
        doc: UserDoc = {
            "_id": name,
            "uid": old["uid"] if old else uuid.uuid4().hex,
            "keys": keys,
            "fingerprints": prints,
            "created_at": old["created_at"] if old else now,
            "updated_at": now,
        }
        await self._store.put_user(doc)
        return doc

    async def list_users(self) -> list[UserDoc]:
        """Every user."""
        return await self._store.list_users()

    async def remove_user(self, name: str) -> tuple[int, int]:
        """Remove a user and her grants; end her sessions. Returns (grants, sessions)."""
        if not await self._store.delete_user(name):
            raise NotFoundError(f"no user {name!r}")
        grants = await self._store.list_grants(name)
        for g in grants:
            await self._store.delete_grant(g["_id"])
        ended = self._live.end_where(lambda s: s.user == name, "user_removed")
        return len(grants), ended

    # ---- grants -----------------------------------------------------------------------------

    async def add_grant(
        self,
        user: str,
        *,
        app: str | None,
        machine_id: str | None,
        login: str,
        ttl_s: int,
        record_input: bool,
        grant_id: str | None = None,
    ) -> GrantDoc:
        """Grant ``user`` ``login`` on a machine or an app's machines for ``ttl_s`` seconds."""
        owner = await self._store.get_user(user)
        if owner is None:
            raise NotFoundError(f"no user {user!r}")
        now = utcnow()
        doc: GrantDoc = {
            "_id": grant_id or f"g-{secrets.token_hex(6)}",
            "user": user,
            "user_uid": owner["uid"],
            "app": app,
            "machine_id": machine_id,
            "login": login,
            "record_input": record_input,
            "created_at": now,
            "expires_at": now + timedelta(seconds=ttl_s),
        }
        try:
            await self._store.insert_grant(doc)
        except ConflictError:
            # A retried add with the caller's id: the grant it made is the answer.
            old = await self._store.get_grant(doc["_id"])
            same = old is not None and all(
                old[k] == doc[k]
                for k in ("user", "app", "machine_id", "login")  # type: ignore[literal-required]
            )
            if not same or old is None:
                raise
            return old
        return doc

    async def list_grants(self, user: str | None, include_expired: bool) -> list[GrantDoc]:
        """Grants, live ones only unless ``include_expired``."""
        grants = await self._store.list_grants(user)
        now = utcnow()
        return [g for g in grants if include_expired or g["expires_at"] > now]

    async def revoke_grant(self, grant_id: str) -> int:
        """Revoke a grant; end the sessions it let in. Returns how many ended."""
        if not await self._store.delete_grant(grant_id):
            raise NotFoundError(f"no grant {grant_id!r}")
        return self._live.end_where(lambda s: s.grant_id == grant_id, "revoked")

    # ---- command rules ----------------------------------------------------------------------

    async def add_rule(self, pattern: str, description: str) -> RuleDoc:
        """Add a command rule (the pattern must compile)."""
        compile_rule(pattern)
        doc: RuleDoc = {
            "_id": f"r-{secrets.token_hex(6)}",
            "pattern": pattern,
            "description": description,
            "created_at": utcnow(),
        }
        await self._store.insert_rule(doc)
        await self._live.refresh_rules()
        return doc

    async def list_rules(self) -> list[RuleDoc]:
        """Every command rule."""
        return await self._store.list_rules()

    async def remove_rule(self, rule_id: str) -> None:
        """Remove a command rule."""
        if not await self._store.delete_rule(rule_id):
            raise NotFoundError(f"no rule {rule_id!r}")
        await self._live.refresh_rules()

    # ---- sessions ---------------------------------------------------------------------------

    async def list_sessions(self, flt: SessionFilter, limit: int) -> list[SessionDoc]:
        """Sessions, newest first."""
        if flt.get("since") and flt.get("until") and flt["since"] > flt["until"]:
            raise ValidationFailed("since is after until")
        return await self._store.list_sessions(flt, limit)

    async def get_session(self, session_id: str) -> SessionDoc:
        """One session."""
        doc = await self._store.get_session(session_id)
        if doc is None:
            raise NotFoundError(f"no session {session_id!r}")
        return doc

    async def end_session(self, session_id: str) -> bool:
        """End a live session; False when it was not live here."""
        await self.get_session(session_id)
        return self._live.end_where(lambda s: s.id == session_id, "ended_by_admin") > 0

    async def recording(self, session_id: str, offset: int, limit: int) -> RecordingSlice:
        """A slice of the session's cast from ``offset``."""
        doc = await self.get_session(session_id)
        path = doc.get("recording_path")
        if doc["kind"] == "sftp":
            raise NotFoundError(
                f"session {session_id} is an sftp session: sftp sessions have no terminal "
                f"recording; its transfers are in its record (GET /v1/sessions/{session_id})"
            )
        if not path or not Path(path).exists():
            raise NotFoundError(f"session {session_id} has no recording")
        data, size = read_chunk(Path(path), offset, limit)
        return RecordingSlice(path, offset, data, size, doc["live"] and self._live.has(session_id))
