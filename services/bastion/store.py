"""Persistence of the bastion: the :class:`BastionStore` port and its MongoDB adapter, and the
:class:`MachineDirectory` read of the gateway's machines.

The in-memory twins are in :mod:`services.bastion.fakes`; the contract test runs both.

How this copes with FerretDB v1 (SQLite):

- Every document has one writer or is written whole. A user is replaced whole by name (the
  last ``user.add`` wins, which is what replacing keys means); a grant and a rule are inserted
  once under their ``_id`` (the unique ``_id`` is the one arbiter: a retried ``grant.add`` with
  the same id is answered with the stored grant) and deleted to revoke; a session is inserted
  and then updated only by the bastion process that owns it (``owner``), so no update is lost.
- A user removed while a grant for her is being added would leave an orphan grant; a grant
  names the user's ``uid`` (minted at first add) and is worth nothing for another uid.
- Filters and sorts are not pushed down: every query scans its collection. The collections are
  small (people, grants, rules); sessions grow, so a session listing reads one batch through
  :func:`read_all` and is bounded by ``limit`` after the filter.
- Sessions past the retention are deleted by id (``delete_sessions``), after their casts; the
  candidates are read with a projection (small documents, one batch through ``read_all``).
- A machine's pinned host keys (``bastion_host_keys``, ``_id`` = machine id) are inserted once,
  the unique ``_id`` arbitrating between two first sessions; they are never updated.
- Machines are read from the gateway's ``machine_summaries`` (one small document per machine,
  written by the gateway): the bastion never writes there. Reading it keeps an app grant
  covering machines created later with no message to miss, and costs one scan per login.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.clock import utcnow
from libs.common.db import read_all
from libs.common.errors import ConflictError, translate_errors

from .documents import GrantDoc, MachineView, RuleDoc, SessionDoc, UserDoc

__all__ = [
    "GONE_STATES",
    "BastionStore",
    "HostKeyPins",
    "MachineDirectory",
    "MongoBastionStore",
    "MongoHostKeyPins",
    "MongoMachineDirectory",
    "SessionFilter",
]

USERS, GRANTS = "bastion_users", "bastion_grants"
RULES, SESSIONS = "bastion_rules", "bastion_sessions"
SUMMARIES = "machine_summaries"
HOST_KEYS = "bastion_host_keys"
GONE_STATES = ("destroyed", "failed", "destroying", "requested")
_MACHINE_FIELDS = {
    "_id": 1, "app": 1, "state": 1, "hostname": 1, "ip": 1, "host": 1, "host_keys": 1,
}  # fmt: skip

SessionFilter = dict[str, Any]


class BastionStore(Protocol):
    """Port: the bastion's users, grants, rules and sessions."""

    async def get_user(self, name: str) -> UserDoc | None:
        """One user, or None."""
        ...

    async def put_user(self, doc: UserDoc) -> None:
        """Insert or replace a user whole."""
        ...

    async def list_users(self) -> list[UserDoc]:
        """Every user, by name."""
        ...

    async def delete_user(self, name: str) -> bool:
        """Remove a user; False if there was none."""
        ...

    async def insert_grant(self, doc: GrantDoc) -> None:
        """Insert a grant; :class:`ConflictError` if its id exists."""
        ...

    async def get_grant(self, grant_id: str) -> GrantDoc | None:
        """One grant, or None."""
        ...

    async def list_grants(self, user: str | None = None) -> list[GrantDoc]:
        """Grants (of one user), oldest first."""
        ...

    async def delete_grant(self, grant_id: str) -> bool:
        """Revoke a grant; False if there was none."""
        ...

    async def insert_rule(self, doc: RuleDoc) -> None:
        """Insert a command rule."""
        ...

    async def list_rules(self) -> list[RuleDoc]:
        """Every command rule, oldest first."""
        ...

    async def delete_rule(self, rule_id: str) -> bool:
        """Remove a rule; False if there was none."""
        ...

    async def insert_session(self, doc: SessionDoc) -> None:
        """Record a session that starts."""
        ...

    async def update_session(self, session_id: str, fields: dict[str, Any]) -> None:
        """Set fields of a session (only its owner calls this)."""
        ...

    async def get_session(self, session_id: str) -> SessionDoc | None:
        """One session, or None."""
        ...

    async def list_sessions(self, flt: SessionFilter, limit: int) -> list[SessionDoc]:
        """Sessions matching ``flt`` (user, ip, machine_id, since, until, live), newest first."""
        ...

    async def ended_before(self, cutoff: datetime) -> list[SessionDoc]:
        """Sessions that ended before ``cutoff`` (``_id``, ``live``, ``ended_at`` and
        ``recording_path`` only)."""
        ...

    async def delete_sessions(self, session_ids: list[str]) -> int:
        """Delete sessions by id; how many there were."""
        ...


class HostKeyPins(Protocol):
    """Port: the host keys each machine must present, pinned at the first session."""

    async def pinned(self, machine_id: str) -> list[str] | None:
        """The keys pinned for the machine, or None."""
        ...

    async def pin(self, machine_id: str, keys: list[str]) -> list[str]:
        """Pin ``keys`` unless keys are pinned already; return what is pinned."""
        ...


class MachineDirectory(Protocol):
    """Port: the machines that exist, as the gateway knows them (read-only)."""

    async def named(self, name: str) -> list[MachineView]:
        """Machines whose IP, id or hostname is ``name`` (not destroyed)."""
        ...

    async def of(self, apps: list[str], ids: list[str]) -> list[MachineView]:
        """Machines of any of ``apps`` or with any of ``ids`` (not destroyed)."""
        ...


def session_query(flt: SessionFilter) -> dict[str, Any]:
    """The MongoDB filter for a session listing."""
    query: dict[str, Any] = {}
    for key in ("user", "ip", "machine_id", "live"):
        if flt.get(key) is not None:
            query[key] = flt[key]
    started: dict[str, datetime] = {}
    if flt.get("since") is not None:
        started["$gte"] = flt["since"]
    if flt.get("until") is not None:
        started["$lte"] = flt["until"]
    if started:
        query["started_at"] = started
    return query


class MongoBastionStore:
    """:class:`BastionStore` on MongoDB / FerretDB v1."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._db = db

    @translate_errors
    async def get_user(self, name: str) -> UserDoc | None:
        """One user, or None."""
        return await self._db[USERS].find_one({"_id": name})

    @translate_errors
    async def put_user(self, doc: UserDoc) -> None:
        """Insert or replace a user whole."""
        await self._db[USERS].replace_one({"_id": doc["_id"]}, doc, upsert=True)

    @translate_errors
    async def list_users(self) -> list[UserDoc]:
        """Every user, by name."""
        docs = await read_all(self._db[USERS].find({}))
        return sorted(docs, key=lambda d: d["_id"])

    @translate_errors
    async def delete_user(self, name: str) -> bool:
        """Remove a user; False if there was none."""
        return (await self._db[USERS].delete_one({"_id": name})).deleted_count > 0

    @translate_errors
    async def insert_grant(self, doc: GrantDoc) -> None:
        """Insert a grant; :class:`ConflictError` if its id exists."""
        try:
            await self._db[GRANTS].insert_one(doc)
        except DuplicateKeyError as err:
            raise ConflictError(f"grant {doc['_id']} exists") from err

    @translate_errors
    async def get_grant(self, grant_id: str) -> GrantDoc | None:
        """One grant, or None."""
        return await self._db[GRANTS].find_one({"_id": grant_id})

    @translate_errors
    async def list_grants(self, user: str | None = None) -> list[GrantDoc]:
        """Grants (of one user), oldest first."""
        docs = await read_all(self._db[GRANTS].find({} if user is None else {"user": user}))
        return sorted(docs, key=lambda d: (d["created_at"], d["_id"]))

    @translate_errors
    async def delete_grant(self, grant_id: str) -> bool:
        """Revoke a grant; False if there was none."""
        return (await self._db[GRANTS].delete_one({"_id": grant_id})).deleted_count > 0

    @translate_errors
    async def insert_rule(self, doc: RuleDoc) -> None:
        """Insert a command rule."""
        await self._db[RULES].insert_one(doc)

    @translate_errors
    async def list_rules(self) -> list[RuleDoc]:
        """Every command rule, oldest first."""
        docs = await read_all(self._db[RULES].find({}))
        return sorted(docs, key=lambda d: (d["created_at"], d["_id"]))

    @translate_errors
    async def delete_rule(self, rule_id: str) -> bool:
        """Remove a rule; False if there was none."""
        return (await self._db[RULES].delete_one({"_id": rule_id})).deleted_count > 0

    @translate_errors
    async def insert_session(self, doc: SessionDoc) -> None:
        """Record a session that starts."""
        await self._db[SESSIONS].insert_one(doc)

    @translate_errors
    async def update_session(self, session_id: str, fields: dict[str, Any]) -> None:
        """Set fields of a session (only its owner calls this)."""
        await self._db[SESSIONS].update_one({"_id": session_id}, {"$set": fields})

    @translate_errors
    async def get_session(self, session_id: str) -> SessionDoc | None:
        """One session, or None."""
        return await self._db[SESSIONS].find_one({"_id": session_id})

    @translate_errors
    async def list_sessions(self, flt: SessionFilter, limit: int) -> list[SessionDoc]:
        """Sessions matching ``flt``, newest first."""
        docs = await read_all(self._db[SESSIONS].find(session_query(flt)))
        docs.sort(key=lambda d: (d["started_at"], d["_id"]), reverse=True)
        return docs[:limit]

    @translate_errors
    async def ended_before(self, cutoff: datetime) -> list[SessionDoc]:
        """Sessions that ended before ``cutoff`` (a few fields each)."""
        query = {"live": False, "ended_at": {"$lt": cutoff}}
        fields = {"_id": 1, "live": 1, "ended_at": 1, "recording_path": 1}
        return await read_all(self._db[SESSIONS].find(query, fields))

    @translate_errors
    async def delete_sessions(self, session_ids: list[str]) -> int:
        """Delete sessions by id; how many there were."""
        if not session_ids:
            return 0
        res = await self._db[SESSIONS].delete_many({"_id": {"$in": session_ids}})
        return res.deleted_count


class MongoHostKeyPins:
    """:class:`HostKeyPins` over ``bastion_host_keys``."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._col = db[HOST_KEYS]

    @translate_errors
    async def pinned(self, machine_id: str) -> list[str] | None:
        """The keys pinned for the machine, or None."""
        doc = await self._col.find_one({"_id": machine_id})
        return list(doc["keys"]) if doc else None

    @translate_errors
    async def pin(self, machine_id: str, keys: list[str]) -> list[str]:
        """Pin ``keys`` unless keys are pinned already; return what is pinned."""
        try:
            await self._col.insert_one({"_id": machine_id, "keys": keys, "pinned_at": utcnow()})
        except DuplicateKeyError:
            return await self.pinned(machine_id) or keys
        return keys


class MongoMachineDirectory:
    """:class:`MachineDirectory` over the gateway's ``machine_summaries`` (read-only)."""

    def __init__(self, db: AsyncDatabase) -> None:
        self._col = db[SUMMARIES]

    async def _find(self, query: dict[str, Any]) -> list[MachineView]:
        query = {**query, "state": {"$nin": list(GONE_STATES)}}
        docs = await read_all(self._col.find(query, _MACHINE_FIELDS))
        return sorted(docs, key=lambda d: d["_id"])

    @translate_errors
    async def named(self, name: str) -> list[MachineView]:
        """Machines whose IP, id or hostname is ``name``."""
        return await self._find({"$or": [{"ip": name}, {"_id": name}, {"hostname": name}]})

    @translate_errors
    async def of(self, apps: list[str], ids: list[str]) -> list[MachineView]:
        """Machines of any of ``apps`` or with any of ``ids``."""
        if not apps and not ids:
            return []
        return await self._find({"$or": [{"app": {"$in": apps}}, {"_id": {"$in": ids}}]})
