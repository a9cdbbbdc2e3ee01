"""In-memory twins of the bastion's ports, for unit tests (the contract test runs them beside
the MongoDB adapters)."""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

from libs.common.errors import ConflictError

from .documents import GrantDoc, MachineView, RuleDoc, SessionDoc, UserDoc
from .store import GONE_STATES, SessionFilter

__all__ = ["MemoryBastionStore", "MemoryHostKeyPins", "MemoryMachines"]


def _matches(doc: SessionDoc, flt: SessionFilter) -> bool:
    for key in ("user", "ip", "machine_id", "live"):
        if flt.get(key) is not None and doc.get(key) != flt[key]:
            return False
    if flt.get("since") is not None and doc["started_at"] < flt["since"]:
        return False
    return not (flt.get("until") is not None and doc["started_at"] > flt["until"])


class MemoryBastionStore:
    """:class:`~services.bastion.store.BastionStore` in dicts."""

    def __init__(self) -> None:
        self.users: dict[str, UserDoc] = {}
        self.grants: dict[str, GrantDoc] = {}
        self.rules: dict[str, RuleDoc] = {}
        self.sessions: dict[str, SessionDoc] = {}

    async def get_user(self, name: str) -> UserDoc | None:
        """One user, or None."""
        return copy.deepcopy(self.users.get(name))

    async def put_user(self, doc: UserDoc) -> None:
        """Insert or replace a user whole."""
        self.users[doc["_id"]] = copy.deepcopy(doc)

    async def list_users(self) -> list[UserDoc]:
        """Every user, by name."""
        return [copy.deepcopy(self.users[k]) for k in sorted(self.users)]

    async def delete_user(self, name: str) -> bool:
        """Remove a user; False if there was none."""
        return self.users.pop(name, None) is not None

    async def insert_grant(self, doc: GrantDoc) -> None:
        """Insert a grant; :class:`ConflictError` if its id exists."""
        if doc["_id"] in self.grants:
            raise ConflictError(f"grant {doc['_id']} exists")
        self.grants[doc["_id"]] = copy.deepcopy(doc)

    async def get_grant(self, grant_id: str) -> GrantDoc | None:
        """One grant, or None."""
        return copy.deepcopy(self.grants.get(grant_id))

    async def list_grants(self, user: str | None = None) -> list[GrantDoc]:
        """Grants (of one user), oldest first."""
        docs = [g for g in self.grants.values() if user is None or g["user"] == user]
        return copy.deepcopy(sorted(docs, key=lambda d: (d["created_at"], d["_id"])))

    async def delete_grant(self, grant_id: str) -> bool:
        """Revoke a grant; False if there was none."""
        return self.grants.pop(grant_id, None) is not None

    async def insert_rule(self, doc: RuleDoc) -> None:
        """Insert a command rule."""
        if doc["_id"] in self.rules:
            raise ConflictError(f"rule {doc['_id']} exists")
        self.rules[doc["_id"]] = copy.deepcopy(doc)

    async def list_rules(self) -> list[RuleDoc]:
        """Every command rule, oldest first."""
        docs = sorted(self.rules.values(), key=lambda d: (d["created_at"], d["_id"]))
        return copy.deepcopy(docs)

    async def delete_rule(self, rule_id: str) -> bool:
        """Remove a rule; False if there was none."""
        return self.rules.pop(rule_id, None) is not None

    async def insert_session(self, doc: SessionDoc) -> None:
        """Record a session that starts."""
        if doc["_id"] in self.sessions:
            raise ConflictError(f"session {doc['_id']} exists")
        self.sessions[doc["_id"]] = copy.deepcopy(doc)

    async def update_session(self, session_id: str, fields: dict[str, Any]) -> None:
        """Set fields of a session."""
        if session_id in self.sessions:
            self.sessions[session_id].update(copy.deepcopy(fields))  # type: ignore[typeddict-item]

    async def get_session(self, session_id: str) -> SessionDoc | None:
        """One session, or None."""
        return copy.deepcopy(self.sessions.get(session_id))

    async def list_sessions(self, flt: SessionFilter, limit: int) -> list[SessionDoc]:
        """Sessions matching ``flt``, newest first."""
        docs = [d for d in self.sessions.values() if _matches(d, flt)]
        docs.sort(key=lambda d: (d["started_at"], d["_id"]), reverse=True)
        return copy.deepcopy(docs[:limit])

    async def ended_before(self, cutoff: datetime) -> list[SessionDoc]:
        """Sessions that ended before ``cutoff``."""
        return copy.deepcopy([
            d for d in self.sessions.values()
            if not d["live"] and d["ended_at"] is not None and d["ended_at"] < cutoff
        ])  # fmt: skip

    async def delete_sessions(self, session_ids: list[str]) -> int:
        """Delete sessions by id; how many there were."""
        return sum(self.sessions.pop(sid, None) is not None for sid in session_ids)


class MemoryHostKeyPins:
    """:class:`~services.bastion.store.HostKeyPins` in a dict."""

    def __init__(self) -> None:
        self.keys: dict[str, list[str]] = {}

    async def pinned(self, machine_id: str) -> list[str] | None:
        """The keys pinned for the machine, or None."""
        return self.keys.get(machine_id)

    async def pin(self, machine_id: str, keys: list[str]) -> list[str]:
        """Pin ``keys`` unless keys are pinned already; return what is pinned."""
        return self.keys.setdefault(machine_id, list(keys))


class MemoryMachines:
    """:class:`~services.bastion.store.MachineDirectory` over a list."""

    def __init__(self, machines: list[MachineView] | None = None) -> None:
        self.machines: list[MachineView] = list(machines or [])

    def _live(self) -> list[MachineView]:
        live = [m for m in self.machines if m["state"] not in GONE_STATES]
        return sorted(live, key=lambda m: m["_id"])

    async def named(self, name: str) -> list[MachineView]:
        """Machines whose IP, id or hostname is ``name``."""
        return [m for m in self._live() if name in (m.get("ip"), m["_id"], m["hostname"])]

    async def of(self, apps: list[str], ids: list[str]) -> list[MachineView]:
        """Machines of any of ``apps`` or with any of ``ids``."""
        return [m for m in self._live() if m["app"] in apps or m["_id"] in ids]
