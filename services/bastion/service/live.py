"""Live sessions: the registry of what is connected now, their records and events, and the
watchdog that ends them.

A session ends when its grant is revoked or expires, its user is removed, it is idle longer
than the idle timeout, or it has lasted the maximum duration. An admin's RPC ends the
sessions it concerns at once; the watchdog re-reads grants and users every
``watch_interval_s`` (1 s), so a grant deleted any other way (or by another bastion's RPC)
still ends its sessions within about a second.

The session document is written only by this process (``owner``): inserted at start, set at
end. At start-up, sessions another process left ``live`` (it crashed) are closed with reason
``error`` and the time their recording was last written.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Counter, Gauge

from libs.common.bus import Publisher
from libs.common.clock import utcnow
from libs.common.contracts.bastion import CommandBlocked, SessionEnded, SessionStarted

from ..documents import RuleDoc, SessionDoc
from ..domain import CompiledRule, compile_rules, grant_alive, matching_rule
from ..store import BastionStore

__all__ = ["LiveSession", "LiveSessions"]

log = structlog.get_logger("bastion.live")

_LIVE = Gauge("dockvm_bastion_live_sessions", "Sessions in progress through this bastion")
_ENDED = Counter(
    "dockvm_bastion_sessions_ended_total", "Sessions ended, by kind and reason", ["kind", "reason"]
)
_BYTES = Counter(
    "dockvm_bastion_session_bytes_total", "Bytes relayed by ended sessions", ["direction"]
)
_BLOCKED = Counter("dockvm_bastion_commands_blocked_total", "Commands a rule refused", ["kind"])


@dataclass
class LiveSession:
    """A session in progress, as the registry and the watchdog see it."""

    doc: SessionDoc
    user_uid: str
    on_end: Callable[[str], None]
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    end_reason: str | None = None

    @property
    def id(self) -> str:
        """The session id."""
        return self.doc["_id"]

    @property
    def user(self) -> str:
        """Who is logged in."""
        return self.doc["user"]

    @property
    def grant_id(self) -> str | None:
        """The grant that let her in."""
        return self.doc["grant_id"]

    def touch(self) -> None:
        """Something went through: the session is not idle."""
        self.last_activity = time.monotonic()

    def end(self, reason: str) -> bool:
        """Ask the relay to end the session (first reason wins); True if it was not ending."""
        if self.end_reason is not None:
            return False
        self.end_reason = reason
        self.on_end(reason)
        return True


class LiveSessions:
    """The live sessions of this bastion process, their records and the command rules."""

    def __init__(
        self,
        store: BastionStore,
        publisher: Publisher,
        owner: str,
        *,
        idle_timeout_s: float,
        max_session_s: float,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self.owner = owner
        self._idle = idle_timeout_s
        self._max = max_session_s
        self._sessions: dict[str, LiveSession] = {}
        self._none_live = asyncio.Event()
        self._none_live.set()
        self.rules: list[CompiledRule] = []
        self._rule_docs: dict[str, RuleDoc] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def has(self, session_id: str) -> bool:
        """True while ``session_id`` is live here."""
        return session_id in self._sessions

    async def wait_none_live(self) -> None:
        """Return once no session is live here."""
        await self._none_live.wait()

    def end_where(self, pred: Callable[[LiveSession], bool], reason: str) -> int:
        """End every live session ``pred`` selects; return how many."""
        return sum(1 for s in list(self._sessions.values()) if pred(s) and s.end(reason))

    async def refresh_rules(self) -> None:
        """Re-read the command rules."""
        docs = await self._store.list_rules()
        self._rule_docs = {d["_id"]: d for d in docs}
        self.rules = compile_rules(docs)

    def blocking_rule(self, command: str) -> CompiledRule | None:
        """The command rule ``command`` matches, if any."""
        return matching_rule(self.rules, command)

    async def blocked(
        self, doc: SessionDoc | dict[str, Any], command: str, rule: CompiledRule
    ) -> None:
        """Announce a command a rule refused (``doc``: the session, or what is known of it)."""
        _BLOCKED.labels(doc["kind"]).inc()
        await self._publisher.publish(
            CommandBlocked(
                session_id=doc.get("_id"),
                user=doc["user"],
                login=doc["login"],
                machine_id=doc.get("machine_id"),
                ip=doc.get("ip"),
                command=command[:4096],
                rule_id=rule.id,
                pattern=rule.pattern,
                kind=doc["kind"],
                at=utcnow(),
            )
        )

    async def start(self, session: LiveSession) -> None:
        """Record a session that starts, and announce it."""
        self._sessions[session.id] = session
        self._none_live.clear()
        _LIVE.set(len(self._sessions))
        doc = session.doc
        await self._store.insert_session(doc)
        await self._publisher.publish(
            SessionStarted(**_facts(doc), started_at=doc["started_at"])  # type: ignore[arg-type]
        )

    async def note(self, session: LiveSession, fields: dict[str, object]) -> None:
        """Record more of a live session (an sftp session's transfers so far)."""
        session.doc.update(fields)  # type: ignore[typeddict-item]
        await self._store.update_session(session.id, dict(fields))

    async def finish(self, session: LiveSession, fields: dict[str, object]) -> None:
        """Record how a session ended, and announce it."""
        self._sessions.pop(session.id, None)
        if not self._sessions:
            self._none_live.set()
        _LIVE.set(len(self._sessions))
        doc = session.doc
        doc.update(fields)  # type: ignore[typeddict-item]
        doc.update(live=False, ended_at=utcnow())
        doc["end_reason"] = session.end_reason or doc.get("end_reason") or "exit"
        update = dict(fields)
        for k in ("live", "ended_at", "end_reason"):
            update[k] = doc[k]  # type: ignore[literal-required]
        _ENDED.labels(doc["kind"], doc["end_reason"]).inc()
        _BYTES.labels("in").inc(doc["bytes_in"])
        _BYTES.labels("out").inc(doc["bytes_out"])
        await self._store.update_session(session.id, update)
        await self._publisher.publish(
            SessionEnded(
                **_facts(doc),
                started_at=doc["started_at"],
                ended_at=doc["ended_at"],
                exit_status=doc["exit_status"],
                end_reason=doc["end_reason"],
                bytes_in=doc["bytes_in"],
                bytes_out=doc["bytes_out"],
                recording_path=doc["recording_path"],
            )  # type: ignore[arg-type]
        )

    async def watch(self) -> None:
        """One round of the watchdog: end what must end."""
        if not self._sessions:
            return
        now, mono = utcnow(), time.monotonic()
        grants = {g["_id"]: g for g in await self._store.list_grants()}
        users = {}
        for name in {s.user for s in self._sessions.values()}:
            users[name] = await self._store.get_user(name)
        for s in list(self._sessions.values()):
            grant = grants.get(s.grant_id or "")
            user = users.get(s.user)
            why = grant_alive(grant, user, now)
            if why is None and user is not None and user["uid"] != s.user_uid:
                why = "user_removed"
            if why is None and mono - s.last_activity > self._idle:
                why = "idle"
            if why is None and mono - s.started > self._max:
                why = "max_duration"
            if why is not None and s.end(why):
                log.info("session ended by the bastion", session_id=s.id, reason=why)

    async def recover(self) -> int:
        """Close the sessions a crashed bastion of this host left live; return how many."""
        stale = await self._store.list_sessions({"live": True}, 100_000)
        closed = 0
        for doc in stale:
            if not _owner_gone(doc.get("owner", ""), self.owner):
                continue
            ended = max(_last_written(doc.get("recording_path")) or utcnow(), doc["started_at"])
            await self._store.update_session(
                doc["_id"], {"live": False, "ended_at": ended, "end_reason": "error"}
            )
            closed += 1
        return closed


def _facts(doc: SessionDoc) -> dict[str, object]:
    return {
        "session_id": doc["_id"],
        "user": doc["user"],
        "login": doc["login"],
        "machine_id": doc["machine_id"],
        "app": doc["app"],
        "ip": doc["ip"],
        "kind": doc["kind"],
        "command": doc["command"],
        "client_addr": doc["client_addr"],
        "grant_id": doc["grant_id"],
    }


def _owner_gone(owner: str, me: str) -> bool:
    """True when ``owner`` (``host:pid:nonce``) was a process of this host that is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if owner == me or host != me.partition(":")[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    # A live pid may be a new process that reuses the number; its nonce tells.
    return False


def _last_written(path: str | None) -> datetime | None:
    if not path:
        return None
    try:
        mtime = os.stat(Path(path)).st_mtime
    except OSError:
        return None
    at = datetime.fromtimestamp(mtime, UTC)
    return at.replace(microsecond=at.microsecond // 1000 * 1000)  # what BSON keeps
