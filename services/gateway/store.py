"""The gateway's MongoDB state: machines (and their summaries), hosts, apps, tokens, the audit
log, idempotency keys, and releases.

Every state change is one conditional ``find_one_and_update`` (the expected current state is in
the filter), so on MongoDB two deliveries of the same event, or two replicas, cannot both apply
it. FerretDB v1 runs that update as a read, then a whole-document write, so two concurrent
writes to one machine can both match and the later one wins; within a process a machine's writes
are therefore serialized (:meth:`GatewayStore._machine_lock`). Across gateway replicas on
FerretDB the window remains: run several replicas on a real MongoDB. Releases avoid the
problem by never having two writers on one document (see :class:`ReleaseStore`).

Every read that may return more than 101 documents goes through
:func:`~libs.common.db.read_all`, so it completes in one batch and FerretDB frees its SQLite
connection at once (many open cursors at once wedged FerretDB for good).

Listing reads ``machine_summaries``: one small document per machine (what a list item shows),
because FerretDB v1 does not push a sort down: a page sorted by ``_id`` reads every document of
the collection, and full machine documents (with their history) made that 6x slower. A summary
has one writer, the code path that writes its machine: inside the same machine lock, right after
the machine's write, it is replaced whole (so the later write carries everything, and two
writes of one summary never interleave in a process). A crash between the two writes leaves the
summary one change behind until the machine's next write or the next start, which rebuilds
every summary that is missing or differs (:meth:`GatewayStore.setup`, idempotent); an old
database gets its summaries the same way. A write that changes no listed field (``last_op``)
leaves the summary alone, so a list item's ``updated_at`` is when a listed field last changed.
Pages are served from memory (:mod:`.listing`), which this store keeps current with every
summary it writes; the collection is what the index loads from and what queries by id read.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Protocol

from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, DuplicateKeyError

from libs.common.clock import utcnow
from libs.common.db import ensure_indexes, read_all
from libs.common.errors import translate_errors

from .access_store import AccessRecords, hash_token
from .app_checks import AppCheckStore
from .documents import (
    AppDoc,
    HostDoc,
    MachineDoc,
    MachineSummary,
    OutboxEntry,
    ReleaseDoc,
    ReleaseMachineStatus,
    SagaRecord,
)
from .domain import ACTIVE_STATES, DcLoad, Res
from .domain.rollout import MachineStatus, ReleaseStatus
from .domain.states import UNREACHABLE_NAMES, State, state_names
from .drains import DrainStore
from .listing import MachineIndex, matches
from .writes import WriteSignal

__all__ = [
    "TRANSITIONS_KEPT",
    "GatewayStore",
    "MachineStore",
    "ReleaseStore",
    "capped_transitions",
    "changes_summary",
    "dc_load",
    "hash_token",
    "history",
    "new_machine_id",
    "page_query",
    "summary_of",
]

MACHINES, SUMMARIES, HOSTS, APPS, TOKENS, AUDIT, IDEMPOTENCY = (
    "machines",
    "machine_summaries",
    "hosts",
    "apps",
    "tokens",
    "audit",
    "idempotency",
)
INDEXES = {
    MACHINES: [
        IndexModel([("app", ASCENDING), ("created_at", ASCENDING)]),
        IndexModel([("state", ASCENDING)]),
        IndexModel([("host", ASCENDING)]),
        IndexModel([("ip", ASCENDING)]),
        IndexModel([("saga.deadline", ASCENDING)]),
        IndexModel([("ip_request", ASCENDING)]),
    ],
    SUMMARIES: [
        IndexModel([("app", ASCENDING)]),
        IndexModel([("state", ASCENDING)]),
        IndexModel([("host", ASCENDING)]),
        IndexModel([("ip", ASCENDING)]),
    ],
    TOKENS: [IndexModel([("name", ASCENDING)])],
    AUDIT: [IndexModel([("at", DESCENDING)])],
}
_ACTIVE = state_names(ACTIVE_STATES)


_last_us = 0


def new_machine_id() -> str:
    """A machine id that sorts by creation time: ``m-<µs hex><random>``. Ids made within one
    microsecond (a bulk create) still sort in the order they were made."""
    global _last_us
    _last_us = max(time.time_ns() // 1000, _last_us + 1)
    return f"m-{_last_us:x}{secrets.token_hex(3)}"


def history(
    via: Iterable[str], to_state: str, at: datetime, reason: str | None
) -> list[dict[str, Any]]:
    """The history entries of a transition to ``to_state`` through ``via`` (the reason is the
    last step's)."""
    return [
        *({"state": s, "at": at, "reason": None} for s in via),
        {"state": to_state, "at": at, "reason": reason},
    ]


# How many of a machine's latest transitions it keeps (besides its first): DOCKVM_TRANSITIONS_KEPT.
TRANSITIONS_KEPT = 50


def capped_transitions(
    transitions: list[dict[str, Any]], kept: int = TRANSITIONS_KEPT
) -> list[dict[str, Any]] | None:
    """The first transition and the last ``kept``; None when the list is within that cap (a
    machine that flaps for months must not grow a document every read has to load)."""
    if len(transitions) <= kept + 1:
        return None
    return [transitions[0], *transitions[len(transitions) - kept :]]


# What a list item shows; a summary holds these, ``pending`` (the saga's op) and ``_id``.
SUMMARY_FIELDS = (
    "type",
    "app",
    "state",
    "reason",
    "image",
    "cpus",
    "memory",
    "disk",
    "dc",
    "vlan_id",
    "hostname",
    "ip",
    "host",
    "created_at",
    "updated_at",
)
# The machine fields a summary is made from: a write touching none of them leaves it alone.
_SUMMARY_SOURCES = frozenset(SUMMARY_FIELDS) - {"updated_at"} | {"saga"}


def summary_of(doc: MachineDoc) -> MachineSummary:
    """The list's view of a machine."""
    out: dict[str, Any] = {"_id": doc["_id"], **{f: doc.get(f) for f in SUMMARY_FIELDS}}
    saga = doc.get("saga") or {}
    out["pending"] = saga.get("op")
    # Not shown: what lets the saga tick find due steps in memory (GatewayStore.due_sagas).
    out["due"] = saga.get("deadline")
    return out  # type: ignore[return-value]


def _deadline(doc: MachineDoc) -> datetime | None:
    return (doc.get("saga") or {}).get("deadline")


def changes_summary(set_: dict[str, Any]) -> bool:
    """Whether an update setting ``set_`` changes what the machine's summary shows."""
    return any(key.split(".", 1)[0] in _SUMMARY_SOURCES for key in set_)


def page_query(filters: dict[str, Any], after: str | None) -> dict[str, Any]:
    """The query of a page: ``filters``, and ids after the cursor ``after``."""
    query = dict(filters)
    if after:
        query["_id"] = {**(query.get("_id") or {}), "$gt": after}
    return query


def dc_load(docs: Iterable[dict[str, Any]]) -> DcLoad:
    """A dc's load from its active, placed machines (``host``, ``app`` and resources)."""
    # Summed here rather than with $group: FerretDB v1 returns 0 for $sum over integers.
    load = DcLoad()
    for d in docs:
        host = d["host"]
        need = Res(float(d["cpus"]), int(d["memory"]), int(d["disk"]))
        load.allocated[host] = load.allocated.get(host, Res()) + need
        per_host = load.apps.setdefault(d["app"], {})
        per_host[host] = per_host.get(host, 0) + 1
    return load


def _outbox_query(ids: Iterable[str] | None) -> dict[str, Any]:
    """Documents with an outbox entry (of ``ids`` only, if given)."""
    query: dict[str, Any] = {"outbox.0": {"$exists": True}}
    if ids is not None:
        query["_id"] = {"$in": list(ids)}
    return query


def _listed(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """A summary without ``updated_at`` (which may lag its machine's, see the docstring); one
    written before summaries carried ``due`` reads as having none, so a gateway's first start
    after that rewrites only the summaries of machines with a saga under way."""
    if summary is None:
        return None
    return {**{k: v for k, v in summary.items() if k != "updated_at"}, "due": summary.get("due")}


async def _insert_new(coll: AsyncCollection[Any], docs: list[Any]) -> set[int]:
    """Insert ``docs``; ones whose id exists already (a replayed request) are kept. Return the
    positions in ``docs`` of those kept."""
    try:
        await coll.insert_many(docs, ordered=False)
    except BulkWriteError as err:
        errors = err.details.get("writeErrors", [])
        if any(e.get("code") != 11000 for e in errors):
            raise
        return {e["index"] for e in errors}
    return set()


class MachineStore(Protocol):
    """Port: what the saga driver needs of the store (Mongo, or the in-memory twin)."""

    async def get(self, machine_id: str) -> MachineDoc | None:
        """One machine, or None."""
        ...

    async def by_ids(self, ids: Iterable[str]) -> list[MachineDoc]:
        """The machines with these ids."""
        ...

    writes: WriteSignal

    def written(self, machine_id: str) -> MachineSummary | None:
        """The machine's summary as this process last wrote or read it (None if not kept)."""
        ...

    async def insert_machines(self, docs: list[MachineDoc]) -> None:
        """Insert, keeping existing ids."""
        ...

    async def transition(
        self,
        machine_id: str,
        from_states: Iterable[str],
        to_state: str,
        *,
        reason: str | None = None,
        set_: dict[str, Any] | None = None,
        saga: SagaRecord | bool | None = False,
        via: Iterable[str] = (),
        outbox: list[OutboxEntry] | None = None,
        match: dict[str, Any] | None = None,
    ) -> MachineDoc | None:
        """Conditional state change (through ``via``, recorded in the history)."""
        ...

    async def update(
        self, machine_id: str, match: dict[str, Any], set_: dict[str, Any]
    ) -> MachineDoc | None:
        """Conditional field update."""
        ...

    async def due_sagas(self, at: datetime, limit: int = 500) -> list[MachineDoc]:
        """Sagas past their deadline."""
        ...

    async def pending_outboxes(self, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Machines (``_id``, ``outbox``) with events not yet published; only ``ids`` if given."""
        ...

    async def clear_outbox(self, machine_id: str, entries: list[OutboxEntry]) -> None:
        """Remove these published entries from the machine's outbox."""
        ...

    async def in_flight(self) -> list[MachineDoc]:
        """Machines with a saga."""
        ...

    async def load(self, dc: str) -> DcLoad:
        """What the hosts of ``dc`` hold: per host, and per app and host."""
        ...

    async def mark_host_unknown(self, host_id: str, states: Iterable[str]) -> list[MachineDoc]:
        """Mark the host's machines unknown."""
        ...

    async def images_in_use(self, dc: str | None = None) -> set[str]:
        """The images of the active machines (of ``dc``)."""
        ...

    async def unknown_on_host(self, host_id: str) -> list[MachineDoc]:
        """The host's unknown machines."""
        ...

    async def ids_on_host(self, host_id: str, states: Iterable[str]) -> list[str]:
        """Ids of the host's machines in ``states``."""
        ...

    async def record_heartbeat(self, doc: HostDoc) -> HostDoc | None:
        """Upsert a host."""
        ...

    async def list_hosts(self) -> list[HostDoc]:
        """Every host."""
        ...

    async def set_host_status(self, host_id: str, old: str | None, new: str) -> bool:
        """Compare-and-set a host's status."""
        ...

    async def save_app_spec(self, app: str, spec: dict[str, Any]) -> None:
        """Remember the app's last spec."""
        ...

    async def find(
        self, filters: dict[str, Any], limit: int, after: str | None = None
    ) -> list[MachineDoc]:
        """A page of machines matching ``filters``, in id order."""
        ...

    async def app_machines(self, app: str, active_only: bool = True) -> list[MachineDoc]:
        """The app's machines, oldest first."""
        ...

    async def get_app(self, app: str) -> AppDoc | None:
        """The app document, or None."""
        ...


class GatewayStore(AccessRecords):
    """All of the gateway's reads and writes."""

    def __init__(
        self,
        db: AsyncDatabase,
        index: MachineIndex | None = None,
        *,
        transitions_kept: int = TRANSITIONS_KEPT,
    ) -> None:
        self._db = db
        self.index = index
        self.transitions_kept = transitions_kept
        self.machines = db[MACHINES]
        self.summaries_coll = db[SUMMARIES]
        self.hosts = db[HOSTS]
        self.apps = db[APPS]
        self.tokens = db[TOKENS]
        self.audit = db[AUDIT]
        self.idempotency = db[IDEMPOTENCY]
        self.checks = AppCheckStore(db)  # the health checks declared per app
        self.drains = DrainStore(db)  # hosts placement skips
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Machines whose summary write failed after their own write (see _write_machine).
        self._behind: set[str] = set()
        self.writes = WriteSignal()

    def written(self, machine_id: str) -> MachineSummary | None:
        """The machine's summary in the listing index (this replica's writes reach it at once;
        others' with its next reload), or None without an index."""
        return None if self.index is None else self.index.get(machine_id)  # type: ignore[return-value]

    def _machine_lock(self, machine_id: str) -> asyncio.Lock:
        """The lock that orders this process's writes to one machine (gone when unused)."""
        lock = self._locks.get(machine_id)
        if lock is None:
            lock = self._locks[machine_id] = asyncio.Lock()
        return lock

    @translate_errors
    async def setup(self) -> None:
        """Create the indexes; build the summaries that are missing or behind."""
        await ensure_indexes(self._db, INDEXES)
        await self.repair_summaries()

    @translate_errors
    async def repair_summaries(self) -> int:
        """Write the summary of every machine whose summary is missing or differs (a crash
        between the two writes, or a database older than summaries); return how many."""
        projection = {f: 1 for f in (*SUMMARY_FIELDS, "saga.op", "saga.deadline")}
        machines = await read_all(self.machines.find({}, projection))
        stored = {d["_id"]: d for d in await read_all(self.summaries_coll.find({}))}
        behind = [
            summary_of(m)
            for m in machines
            if _listed(stored.get(m["_id"])) != _listed(summary_of(m))
        ]
        for summary in behind:
            async with self._machine_lock(summary["_id"]):
                # Re-read under the lock: the machine may have moved since the scan.
                doc = await self.machines.find_one({"_id": summary["_id"]}, projection)
                if doc is not None:
                    await self._write_summary(doc)
        return len(behind)

    async def _write_summary(self, doc: MachineDoc) -> None:
        """Replace the machine's summary whole (called under its machine lock)."""
        summary = summary_of(doc)
        await self.summaries_coll.replace_one({"_id": summary["_id"]}, summary, upsert=True)
        if self.index is not None:
            self.index.put(dict(summary))
        self.writes.wrote()

    # --- machines ---------------------------------------------------------------------------

    @translate_errors
    async def insert_machines(self, docs: list[MachineDoc]) -> None:
        """Insert machine documents; ones that already exist (a replayed request) are kept."""
        if not docs:
            return
        # The machines first: a summary never lists a machine that is not stored.
        await _insert_new(self.machines, docs)
        summaries = [summary_of(d) for d in docs]
        kept = await _insert_new(self.summaries_coll, summaries)
        if self.index is not None:
            # Not the ones a replay found stored: theirs may have moved on since.
            self.index.put_all(dict(s) for i, s in enumerate(summaries) if i not in kept)
        self.writes.wrote()

    @translate_errors
    async def get(self, machine_id: str) -> MachineDoc | None:
        """One machine, or None."""
        return await self.machines.find_one({"_id": machine_id})

    @translate_errors
    async def by_ids(self, ids: Iterable[str]) -> list[MachineDoc]:
        """The machines with these ids, in id order."""
        return await read_all(self.machines.find({"_id": {"$in": list(ids)}}).sort("_id", 1))

    @translate_errors
    async def find(
        self, filters: dict[str, Any], limit: int, after: str | None = None
    ) -> list[MachineDoc]:
        """A page of machines matching ``filters``, after the cursor ``after``, in id order."""
        query = page_query(filters, after)
        return await read_all(self.machines.find(query).sort("_id", 1).limit(limit))

    @translate_errors
    async def summaries(
        self, filters: dict[str, Any], limit: int, after: str | None = None
    ) -> list[MachineSummary]:
        """A page of machine summaries matching ``filters``, after ``after``, in id order: from
        the in-memory index once it is loaded, except for queries by id (see listing.py)."""
        if self.index is not None and self.index.ready and "_id" not in filters:
            return self.index.page(filters, limit, after)  # type: ignore[return-value]
        query = page_query(filters, after)
        return await read_all(self.summaries_coll.find(query).sort("_id", 1).limit(limit))

    @translate_errors
    async def all_summaries(self) -> list[MachineSummary]:
        """Every machine's summary (what the in-memory index reloads from)."""
        return await read_all(self.summaries_coll.find({}))

    @translate_errors
    async def app_machines(self, app: str, active_only: bool = True) -> list[MachineDoc]:
        """The app's machines, oldest first."""
        query: dict[str, Any] = {"app": app}
        if active_only:
            query["state"] = {"$in": _ACTIVE}
        return await read_all(self.machines.find(query).sort("_id", 1))

    @translate_errors
    async def transition(
        self,
        machine_id: str,
        from_states: Iterable[str],
        to_state: str,
        *,
        reason: str | None = None,
        set_: dict[str, Any] | None = None,
        saga: SagaRecord | bool | None = False,
        via: Iterable[str] = (),
        outbox: list[OutboxEntry] | None = None,
        match: dict[str, Any] | None = None,
    ) -> MachineDoc | None:
        """Move a machine from one of ``from_states`` to ``to_state``; None when it was not there
        (or did not also match ``match``, further conditions on its fields).

        ``saga`` replaces the saga record (None clears it; False leaves it alone). The states in
        ``via`` are passed through in the same write: the history records each of them. The
        events in ``outbox`` are appended to the machine's outbox in that write too.
        """
        at = utcnow()
        fields: dict[str, Any] = {"state": to_state, "updated_at": at, "reason": reason}
        fields.update(set_ or {})
        if saga is not False:
            fields["saga"] = saga
        entries = history(via, to_state, at, reason)
        push: dict[str, Any] = {"transitions": {"$each": entries}}
        if outbox:
            push["outbox"] = {"$each": outbox}
        query = {**(match or {}), "_id": machine_id, "state": {"$in": list(from_states)}}
        return await self._write_machine(query, {"$set": fields, "$push": push}, trim=True)

    async def _write_machine(
        self, match: dict[str, Any], update: dict[str, Any], *, trim: bool = False
    ) -> MachineDoc | None:
        """One machine write and its summary's, under the machine's lock, as one unit that a
        cancelled caller cannot cut in two: a handler cancelled as the broker connection
        dropped left a destroyed machine listed as ``destroying`` (the redelivery matched
        nothing, so nothing wrote the summary again). A summary write that fails is retried
        by :meth:`repair_behind`."""

        async def unit() -> MachineDoc | None:
            async with self._machine_lock(match["_id"]):
                doc = await self.machines.find_one_and_update(
                    match, update, return_document=ReturnDocument.AFTER
                )
                if doc is None:
                    return None
                if trim:
                    doc = await self._trim_transitions(doc)
                if trim or changes_summary(update.get("$set") or {}):
                    try:
                        await self._write_summary(doc)
                    except Exception:
                        self._behind.add(doc["_id"])
                        raise
                return doc

        return await asyncio.shield(unit())

    async def repair_behind(self) -> int:
        """Write again the summaries whose write failed in this process; how many were."""
        ids, self._behind = self._behind, set()
        for machine_id in ids:
            async with self._machine_lock(machine_id):
                try:
                    doc = await self.machines.find_one({"_id": machine_id})
                    if doc is not None:
                        await self._write_summary(doc)
                except Exception:
                    self._behind.add(machine_id)
                    raise
        return len(ids)

    async def _trim_transitions(self, doc: MachineDoc) -> MachineDoc:
        """Cap the machine's transitions (called under its machine lock, after a push)."""
        trimmed = capped_transitions(doc.get("transitions") or [], self.transitions_kept)
        if trimmed is None:
            return doc
        # Only if nothing was written since: a later push (another replica's) is never lost,
        # and its own transition trims the list instead.
        await self.machines.update_one(
            {"_id": doc["_id"], "updated_at": doc["updated_at"]},
            {"$set": {"transitions": trimmed}},
        )
        return {**doc, "transitions": trimmed}

    @translate_errors
    async def update(
        self, machine_id: str, match: dict[str, Any], set_: dict[str, Any]
    ) -> MachineDoc | None:
        """Set fields on a machine that matches ``match``; None when it does not."""
        return await self._write_machine(
            {"_id": machine_id, **match}, {"$set": {**set_, "updated_at": utcnow()}}
        )

    @translate_errors
    async def due_sagas(self, at: datetime, limit: int = 500) -> list[MachineDoc]:
        """Machines whose current saga step has passed its deadline (asked every second).

        From the listing index once it is loaded (each summary carries its saga's deadline),
        each candidate read again by ``_id``: the query on ``saga.deadline`` is a scan of every
        machine document on FerretDB v1, which grew with every machine ever made. Another
        replica's saga is seen after the index's next reload (``DOCKVM_LIST_REFRESH_S``)."""
        if self.index is None or not self.index.ready:
            return await read_all(self.machines.find({"saga.deadline": {"$lte": at}}).limit(limit))

        def due(m: dict[str, Any]) -> bool:
            deadline = m.get("due", _deadline(m))  # a summary's copy, or the machine's own
            return deadline is not None and deadline <= at

        candidates = [s["_id"] for s in self.index.select({}) if due(s)]
        return await self._reread(candidates[:limit], due)

    @translate_errors
    async def in_flight(self) -> list[MachineDoc]:
        """Every machine with a saga in progress (resumed at start)."""
        return await read_all(self.machines.find({"saga.op": {"$exists": True}}))

    @translate_errors
    async def pending_outboxes(self, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Machines (``_id``, ``outbox``) with events not yet published; only ``ids`` if given
        (without, a scan of every machine: see services/gateway/outbox.py)."""
        return await read_all(self.machines.find(_outbox_query(ids), {"outbox": 1}))

    @translate_errors
    async def clear_outbox(self, machine_id: str, entries: list[OutboxEntry]) -> None:
        """Remove these published entries (exactly as read back) from the machine's outbox,
        under its lock: FerretDB v1 rewrites the whole document, and an unlocked clear could
        erase a state change written meanwhile."""
        async with self._machine_lock(machine_id):
            await self.machines.update_one(
                {"_id": machine_id}, {"$pullAll": {"outbox": list(entries)}}
            )

    @translate_errors
    async def load(self, dc: str) -> DcLoad:
        """What the gateway has given each host of ``dc`` (summed over its active machines), and
        how many active machines of each app each host holds: one read."""
        docs = await read_all(
            self.machines.find(
                {"dc": dc, "state": {"$in": _ACTIVE}, "host": {"$ne": None}},
                {"host": 1, "app": 1, "cpus": 1, "memory": 1, "disk": 1},
            )
        )
        return dc_load(docs)

    async def allocations(self, dc: str) -> dict[str, Res]:
        """What the gateway has given each host of ``dc``."""
        return (await self.load(dc)).allocated

    @translate_errors
    async def images_in_use(self, dc: str | None = None) -> set[str]:
        """The images of the active machines (of ``dc``): one read of a small projection."""
        query: dict[str, Any] = {"state": {"$in": _ACTIVE}, **({"dc": dc} if dc else {})}
        docs = await read_all(self.machines.find(query, {"image": 1}))
        return {d["image"] for d in docs if d.get("image")}

    @translate_errors
    async def mark_host_unknown(self, host_id: str, states: Iterable[str]) -> list[MachineDoc]:
        """Mark the host's machines in ``states`` unknown, remembering their state; return them."""
        changed = []
        # Read whole before writing: a cursor held open across writes keeps an SQLite
        # connection that the writes may be waiting for.
        docs = await read_all(self.machines.find({"host": host_id, "state": {"$in": list(states)}}))
        for doc in docs:
            moved = await self.transition(
                doc["_id"],
                [doc["state"]],
                State.UNREACHABLE.value,
                reason="host_down",
                set_={"state_before_unknown": doc["state"]},
            )
            if moved is not None:
                changed.append(moved)
        return changed

    @translate_errors
    async def unknown_on_host(self, host_id: str) -> list[MachineDoc]:
        """The host's machines in state unknown (asked at every heartbeat of every host).

        From the listing index once it is loaded, each candidate read again by ``_id``: the
        query by host and state is a scan of every machine document on FerretDB v1, and at one
        per heartbeat it grew with every machine ever made. A machine another replica marked
        unreachable is seen after the index's next reload (``DOCKVM_LIST_REFRESH_S``)."""
        # The state's old name too, in documents stored before the rename.
        names = sorted(UNREACHABLE_NAMES)
        if self.index is None or not self.index.ready:
            return await read_all(self.machines.find({"host": host_id, "state": {"$in": names}}))
        wanted = {"host": host_id, "state": {"$in": names}}
        return await self._reread(
            [s["_id"] for s in self.index.select(wanted)], lambda d: matches(d, wanted)
        )

    async def _reread(self, ids: list[str], keep: Callable[[MachineDoc], bool]) -> list[MachineDoc]:
        """The index's candidates read again, each by ``_id`` (the one read FerretDB v1 does not
        answer with a scan), and kept if they still pass ``keep``."""
        docs = [await self.machines.find_one({"_id": mid}) for mid in ids]
        return [d for d in docs if d is not None and keep(d)]

    @translate_errors
    async def ids_on_host(self, host_id: str, states: Iterable[str]) -> list[str]:
        """Ids of the host's machines in ``states``."""
        cursor = self.machines.find({"host": host_id, "state": {"$in": list(states)}}, {"_id": 1})
        return [d["_id"] for d in await read_all(cursor)]

    @translate_errors
    async def machines_on_ip(self, ip: str) -> list[MachineDoc]:
        """Every machine that held ``ip``, oldest first."""
        return await read_all(self.machines.find({"ip": ip}).sort("_id", 1))

    # --- hosts ------------------------------------------------------------------------------

    @translate_errors
    async def record_heartbeat(self, doc: HostDoc) -> HostDoc | None:
        """Upsert a host from its heartbeat; return the previous document (None if new)."""
        stored = {**doc, "labels": _pairs(doc.get("labels"))}
        before = await self.hosts.find_one_and_update(
            {"_id": doc["_id"]},
            {"$set": stored},
            upsert=True,
            return_document=ReturnDocument.BEFORE,
        )
        return _host_read(before)

    @translate_errors
    async def list_hosts(self) -> list[HostDoc]:
        """Every host that ever sent a heartbeat."""
        return [_host_read(h) for h in await read_all(self.hosts.find({}).sort("_id", 1))]

    @translate_errors
    async def set_host_status(self, host_id: str, old: str | None, new: str) -> bool:
        """Record a host's liveness once; False when another worker already did."""
        res = await self.hosts.update_one(
            {"_id": host_id, "status": old}, {"$set": {"status": new}}
        )
        return res.modified_count == 1

    # --- apps -------------------------------------------------------------------------------

    @translate_errors
    async def save_app_spec(self, app: str, spec: dict[str, Any]) -> None:
        """Remember ``spec`` as the app's last spec (scale-out uses it)."""
        at = utcnow()
        await self.apps.update_one(
            {"_id": app},
            {"$set": {"spec": spec, "updated_at": at}, "$setOnInsert": {"created_at": at}},
            upsert=True,
        )

    @translate_errors
    async def get_app(self, app: str) -> AppDoc | None:
        """The app document, or None."""
        return await self.apps.find_one({"_id": app})


class ReleaseStore:
    """Releases, stored so that concurrent writers never touch the same document.

    FerretDB v1 applies two concurrent updates of one document as read-modify-write, so one is
    lost; results of one batch arrive together, from two gateway replicas as easily as from one.
    Hence three collections:

    - ``releases``: the plan, written once (spec, batches, each machine's host and IP), plus
      ``current_batch``/``status``, written only by the winner of a step below;
    - ``release_machines``: one document per (release, machine) with its deploy status; a
      machine with none is pending;
    - ``release_steps``: ``<release>/batch/<n>`` and ``<release>/end``, whose unique ``_id``
      elects the one caller that moves the release on.

    The end step's event rides in its write (``outbox``); the outbox relay is the release
    document's one other writer, and only after the end. Its clear and the step writes of one
    release are ordered in process (:meth:`_release_lock`), as the machine writes are.
    """

    def __init__(self, db: AsyncDatabase) -> None:
        self.coll = db["releases"]
        self.machines = db["release_machines"]
        self.steps = db["release_steps"]
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def _release_lock(self, release_id: str) -> asyncio.Lock:
        """The lock that orders this process's writes to one release document."""
        lock = self._locks.get(release_id)
        if lock is None:
            lock = self._locks[release_id] = asyncio.Lock()
        return lock

    async def setup(self) -> None:
        """Indexes for listing."""
        await self.coll.create_index([("app", 1), ("created_at", DESCENDING)])
        await self.coll.create_index([("status", 1)])

    async def insert(self, doc: ReleaseDoc) -> bool:
        """Insert a new release; False if its id exists already."""
        try:
            await self.coll.insert_one(doc)
            return True
        except DuplicateKeyError:
            return False

    async def plan(self, release_id: str) -> ReleaseDoc | None:
        """The release document alone, without machine statuses."""
        return await self.coll.find_one({"_id": release_id})

    async def statuses(
        self, release_id: str, machine_ids: list[str]
    ) -> dict[str, ReleaseMachineStatus]:
        """The status documents of these machines (by ``_id``: the one lookup FerretDB v1
        indexes); a machine without one is absent."""
        docs = await asyncio.gather(
            *(self.machines.find_one({"_id": f"{release_id}/{m}"}) for m in machine_ids)
        )
        return {d["machine_id"]: d for d in docs if d is not None}

    async def _with_statuses(self, doc: ReleaseDoc) -> ReleaseDoc:
        found = await self.statuses(doc["_id"], list(doc["machines"]))
        machines = {}
        for mid, static in doc["machines"].items():
            status = found.get(mid, {})
            machines[mid] = {
                **static,
                **{k: v for k, v in status.items() if k not in ("_id", "release_id", "machine_id")},
            }
        latest = max((m["at"] for m in found.values()), default=doc["updated_at"])
        return {**doc, "machines": machines, "updated_at": max(doc["updated_at"], latest)}

    async def get(self, release_id: str) -> ReleaseDoc | None:
        """One release with the status of each of its machines."""
        doc = await self.plan(release_id)
        return None if doc is None else await self._with_statuses(doc)

    async def list(self, app: str | None = None, limit: int = 50) -> list[ReleaseDoc]:
        """Newest releases first."""
        query = {"app": app} if app else {}
        docs = await read_all(self.coll.find(query).sort("created_at", DESCENDING).limit(limit))
        return list(await asyncio.gather(*(self._with_statuses(d) for d in docs)))

    async def running(self) -> list[ReleaseDoc]:
        """Releases still in progress (plans only)."""
        return await read_all(self.coll.find({"status": ReleaseStatus.RUNNING.value}))

    async def set_machine(
        self,
        release_id: str,
        machine_id: str,
        status: MachineStatus,
        from_: list[str],
        **fields: Any,
    ) -> bool:
        """Move one machine to ``status`` if it is in one of ``from_``; whether it moved."""
        update = {"status": status.value, "at": utcnow(), **fields}
        key = f"{release_id}/{machine_id}"
        if MachineStatus.PENDING.value in from_:
            try:
                await self.machines.insert_one(
                    {"_id": key, "release_id": release_id, "machine_id": machine_id, **update}
                )
                return True
            except DuplicateKeyError:
                pass  # no longer pending
        moved = await self.machines.find_one_and_update(
            {"_id": key, "status": {"$in": [s for s in from_ if s != MachineStatus.PENDING]}},
            {"$set": update},
        )
        return moved is not None

    async def take_step(self, release_id: str, step: str) -> bool:
        """Elect the caller that takes ``step`` (``batch/<n>`` or ``end``); True once."""
        try:
            await self.steps.insert_one({"_id": f"{release_id}/{step}", "at": utcnow()})
            return True
        except DuplicateKeyError:
            return False

    async def update(
        self, release_id: str, fields: dict[str, Any], outbox: list[OutboxEntry] | None = None
    ) -> ReleaseDoc | None:
        """Write the release-level fields a step's winner owns (and append ``outbox`` to its
        events in the same write); the document written."""
        update: dict[str, Any] = {"$set": {**fields, "updated_at": utcnow()}}
        if outbox:
            update["$push"] = {"outbox": {"$each": outbox}}
        async with self._release_lock(release_id):
            return await self.coll.find_one_and_update(
                {"_id": release_id}, update, return_document=ReturnDocument.AFTER
            )

    async def pending_outboxes(self, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Releases (``_id``, ``outbox``) with events not yet published; only ``ids`` if given."""
        return await read_all(self.coll.find(_outbox_query(ids), {"outbox": 1}))

    async def clear_outbox(self, release_id: str, entries: list[OutboxEntry]) -> None:
        """Remove these published entries (exactly as read back) from the release's outbox."""
        async with self._release_lock(release_id):
            await self.coll.update_one(
                {"_id": release_id}, {"$pullAll": {"outbox": list(entries)}}
            )


def _pairs(labels: dict[str, str] | None) -> list[dict[str, str]]:
    """A host's labels as stored: ``{key, value}`` documents. Their keys hold dots
    (``dockvm.metrics.monitor``), which FerretDB refuses as field names (and it refuses
    nested arrays, so not ``[key, value]`` pairs either)."""
    return [{"key": k, "value": v} for k, v in sorted((labels or {}).items())]


def _host_read(doc: HostDoc | None) -> HostDoc | None:
    """A stored host with its labels as a dict again (a dict stored before pairs is kept)."""
    if doc is not None and isinstance(doc.get("labels"), list):
        doc["labels"] = {p["key"]: p["value"] for p in doc["labels"]}
    return doc
