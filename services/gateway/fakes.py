"""The gateway's in-memory fakes: a twin of :class:`~services.gateway.store.GatewayStore`.

The twin keeps the same conditional semantics (a transition or update applies only when the filter
matches), so the saga driver can be tested without MongoDB. The store contract test runs the
same cases against both.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from libs.common.clock import utcnow
from libs.common.errors import ConflictError

from .app_checks import check_doc
from .documents import AppDoc, HostDoc, MachineDoc, MachineSummary, OutboxEntry, SagaRecord
from .domain import ACTIVE_STATES, DcLoad, Res
from .domain.states import UNREACHABLE_NAMES, State, state_names
from .drains import MemoryDrainStore
from .store import (
    TRANSITIONS_KEPT,
    capped_transitions,
    changes_summary,
    dc_load,
    hash_token,
    history,
    page_query,
    summary_of,
)
from .writes import WriteSignal

__all__ = ["MemoryAppChecks", "MemoryGatewayStore"]

_ACTIVE = set(state_names(ACTIVE_STATES))
_MISSING = object()


def _get(doc: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = doc
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


def _matches(doc: Mapping[str, Any], query: dict[str, Any]) -> bool:
    for key, cond in query.items():
        value = _get(doc, key)
        if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            for op, arg in cond.items():
                if op == "$in" and (value is _MISSING or value not in arg):
                    return False
                if op == "$nin" and value is not _MISSING and value in arg:
                    return False
                if op == "$ne" and (None if value is _MISSING else value) == arg:
                    return False
                if op == "$exists" and (value is not _MISSING) != arg:
                    return False
                if op == "$gt" and (value in (_MISSING, None) or not value > arg):
                    return False
                if op == "$lte" and (value in (_MISSING, None) or not value <= arg):
                    return False
        elif (None if value is _MISSING else value) != cond:
            return False
    return True


class MemoryAppChecks:
    """The health checks declared per app, in a dict (:class:`.app_checks.AppCheckStore`)."""

    def __init__(self) -> None:
        self.docs: dict[str, dict[str, Any]] = {}

    async def declare(
        self, app: str, name: str, check: dict[str, Any], by: str
    ) -> dict[str, Any]:
        """Declare (or replace) a check."""
        doc = self.docs[f"{app}/{name}"] = check_doc(app, name, check, by)
        return copy.deepcopy(doc)

    async def app_check(self, app: str, name: str) -> dict[str, Any] | None:
        """The declared check, or None."""
        return copy.deepcopy(self.docs.get(f"{app}/{name}"))

    async def app_checks(self, app: str) -> list[dict[str, Any]]:
        """Every check of ``app``, by name."""
        return sorted(
            (copy.deepcopy(d) for d in self.docs.values() if d["app"] == app),
            key=lambda d: d["name"],
        )

    async def withdraw(self, app: str, name: str) -> bool:
        """Forget a declaration."""
        return self.docs.pop(f"{app}/{name}", None) is not None


class MemoryGatewayStore:
    """The subset of the gateway store the saga driver and the API use, in dicts."""

    def __init__(self, *, transitions_kept: int = TRANSITIONS_KEPT) -> None:
        self.transitions_kept = transitions_kept
        self.machines: dict[str, MachineDoc] = {}
        # Written where the Mongo store writes them, so list answers are the same.
        self.summaries_by_id: dict[str, MachineSummary] = {}
        self.hosts: dict[str, HostDoc] = {}
        self.apps: dict[str, AppDoc] = {}
        self.idempotency: dict[str, dict[str, Any]] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.audit: list[dict[str, Any]] = []
        self.checks = MemoryAppChecks()
        self.drains = MemoryDrainStore()
        self.writes = WriteSignal()

    def written(self, machine_id: str) -> MachineSummary | None:
        """The machine's summary (always current here)."""
        summary = self.summaries_by_id.get(machine_id)
        return copy.deepcopy(summary) if summary else None

    async def setup(self) -> None:
        """Nothing to prepare."""

    async def insert_machines(self, docs: list[MachineDoc]) -> None:
        """Insert; existing ids are kept."""
        for d in docs:
            self.machines.setdefault(d["_id"], copy.deepcopy(d))
            self.summaries_by_id.setdefault(d["_id"], summary_of(copy.deepcopy(d)))
        self.writes.wrote()

    async def get(self, machine_id: str) -> MachineDoc | None:
        """One machine (a copy)."""
        doc = self.machines.get(machine_id)
        return copy.deepcopy(doc) if doc else None

    async def by_ids(self, ids: Iterable[str]) -> list[MachineDoc]:
        """The machines with these ids, in id order."""
        wanted = set(ids)
        return [copy.deepcopy(d) for k, d in sorted(self.machines.items()) if k in wanted]

    async def find(
        self, filters: dict[str, Any], limit: int, after: str | None = None
    ) -> list[MachineDoc]:
        """A page in id order."""
        out = [
            d
            for k, d in sorted(self.machines.items())
            if _matches(d, filters) and (after is None or k > after)
        ]
        return copy.deepcopy(out[:limit])

    async def summaries(
        self, filters: dict[str, Any], limit: int, after: str | None = None
    ) -> list[MachineSummary]:
        """A page of summaries in id order."""
        query = page_query(filters, after)
        out = [d for _, d in sorted(self.summaries_by_id.items()) if _matches(d, query)]
        return copy.deepcopy(out[:limit])

    async def app_machines(self, app: str, active_only: bool = True) -> list[MachineDoc]:
        """The app's machines, oldest first."""
        return [
            copy.deepcopy(d)
            for _, d in sorted(self.machines.items())
            if d["app"] == app and (not active_only or d["state"] in _ACTIVE)
        ]

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
        """Conditional state change, as in MongoDB."""
        doc = self.machines.get(machine_id)
        if doc is None or doc["state"] not in set(from_states) or not _matches(doc, match or {}):
            return None
        at = utcnow()
        doc.update({"state": to_state, "updated_at": at, "reason": reason, **(set_ or {})})
        if saga is not False:
            doc["saga"] = copy.deepcopy(saga)
        doc.setdefault("transitions", []).extend(history(via, to_state, at, reason))
        if outbox:
            doc.setdefault("outbox", []).extend(copy.deepcopy(outbox))
        trimmed = capped_transitions(doc["transitions"], self.transitions_kept)
        if trimmed is not None:
            doc["transitions"] = trimmed
        self.summaries_by_id[machine_id] = summary_of(copy.deepcopy(doc))
        self.writes.wrote()
        return copy.deepcopy(doc)

    async def update(
        self, machine_id: str, match: dict[str, Any], set_: dict[str, Any]
    ) -> MachineDoc | None:
        """Conditional field update."""
        doc = self.machines.get(machine_id)
        if doc is None or not _matches(doc, match):
            return None
        doc.update(copy.deepcopy(set_))
        doc["updated_at"] = utcnow()
        if changes_summary(set_):
            self.summaries_by_id[machine_id] = summary_of(copy.deepcopy(doc))
            self.writes.wrote()
        return copy.deepcopy(doc)

    async def due_sagas(self, at: datetime, limit: int = 500) -> list[MachineDoc]:
        """Sagas past their deadline."""
        return [
            copy.deepcopy(d)
            for d in self.machines.values()
            if _matches(d, {"saga.deadline": {"$lte": at}})
        ][:limit]

    async def in_flight(self) -> list[MachineDoc]:
        """Machines with a saga."""
        return [copy.deepcopy(d) for d in self.machines.values() if d.get("saga")]

    async def pending_outboxes(self, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Machines with unpublished events (``_id``, ``outbox``)."""
        wanted = None if ids is None else set(ids)
        return [
            {"_id": k, "outbox": copy.deepcopy(d["outbox"])}
            for k, d in self.machines.items()
            if d.get("outbox") and (wanted is None or k in wanted)
        ]

    async def clear_outbox(self, machine_id: str, entries: list[OutboxEntry]) -> None:
        """Remove exactly these entries."""
        doc = self.machines.get(machine_id)
        if doc is not None:
            doc["outbox"] = [e for e in doc.get("outbox", []) if e not in entries]

    async def load(self, dc: str) -> DcLoad:
        """What the hosts of ``dc`` hold: per host, and per app and host."""
        return dc_load(
            d
            for d in self.machines.values()
            if d["dc"] == dc and d["state"] in _ACTIVE and d.get("host")
        )

    async def allocations(self, dc: str) -> dict[str, Res]:
        """Per-host sums of active machines in ``dc``."""
        return (await self.load(dc)).allocated

    async def images_in_use(self, dc: str | None = None) -> set[str]:
        """The images of the active machines (of ``dc``)."""
        return {
            d["image"]
            for d in self.machines.values()
            if d["state"] in _ACTIVE and (dc is None or d["dc"] == dc)
        }

    async def mark_host_unknown(self, host_id: str, states: Iterable[str]) -> list[MachineDoc]:
        """Mark the host's machines unknown."""
        changed = []
        for d in list(self.machines.values()):
            if d.get("host") == host_id and d["state"] in set(states):
                moved = await self.transition(
                    d["_id"],
                    [d["state"]],
                    State.UNREACHABLE.value,
                    reason="host_down",
                    set_={"state_before_unknown": d["state"]},
                )
                if moved:
                    changed.append(moved)
        return changed

    async def unknown_on_host(self, host_id: str) -> list[MachineDoc]:
        """The host's unknown machines."""
        return [
            copy.deepcopy(d)
            for d in self.machines.values()
            if d.get("host") == host_id and d["state"] in UNREACHABLE_NAMES
        ]

    async def ids_on_host(self, host_id: str, states: Iterable[str]) -> list[str]:
        """Ids of the host's machines in ``states``."""
        wanted = set(states)
        return [
            k for k, d in self.machines.items() if d.get("host") == host_id and d["state"] in wanted
        ]

    async def machines_on_ip(self, ip: str) -> list[MachineDoc]:
        """Machines that held ``ip``."""
        return [copy.deepcopy(d) for _, d in sorted(self.machines.items()) if d.get("ip") == ip]

    async def record_heartbeat(self, doc: HostDoc) -> HostDoc | None:
        """Upsert a host; return the previous document."""
        before = copy.deepcopy(self.hosts.get(doc["_id"]))
        self.hosts.setdefault(doc["_id"], {}).update(copy.deepcopy(doc))
        return before

    async def list_hosts(self) -> list[HostDoc]:
        """Every host."""
        return [copy.deepcopy(h) for _, h in sorted(self.hosts.items())]

    async def set_host_status(self, host_id: str, old: str | None, new: str) -> bool:
        """Compare-and-set a host's status."""
        h = self.hosts.get(host_id)
        if h is None or h.get("status") != old:
            return False
        h["status"] = new
        return True

    async def save_app_spec(self, app: str, spec: dict[str, Any]) -> None:
        """Remember the app's last spec."""
        self.apps[app] = {"_id": app, "spec": copy.deepcopy(spec)}

    async def get_app(self, app: str) -> AppDoc | None:
        """The app, or None."""
        return copy.deepcopy(self.apps.get(app))

    async def get_idempotency(self, key: str) -> dict[str, Any] | None:
        """The record under ``key``."""
        return copy.deepcopy(self.idempotency.get(key))

    async def claim_idempotency(
        self, key: str, fingerprint: str, machine_ids: list[str]
    ) -> dict[str, Any] | None:
        """First writer wins."""
        if key in self.idempotency:
            return copy.deepcopy(self.idempotency[key])
        self.idempotency[key] = {
            "_id": key,
            "fingerprint": fingerprint,
            "ids": machine_ids,
            "at": utcnow(),
        }
        return None

    async def prune(self, idempotency_before: datetime, audit_before: datetime) -> tuple[int, int]:
        """Forget idempotency keys and audit entries older than the cutoffs."""
        old_keys = [k for k, d in self.idempotency.items() if d["at"] < idempotency_before]
        for k in old_keys:
            del self.idempotency[k]
        kept = [e for e in self.audit if e["at"] >= audit_before]
        dropped, self.audit[:] = len(self.audit) - len(kept), kept
        return len(old_keys), dropped

    async def add_token(
        self, token: str, name: str, role: str, apps: list[str] | None = None
    ) -> dict[str, Any]:
        """Store a token hashed."""
        doc = {
            "_id": f"t{len(self.tokens)}",
            "hash": hash_token(token),
            "name": name,
            "role": role,
            "apps": apps,
            "created_at": utcnow(),
            "revoked": False,
        }
        if any(t["hash"] == doc["hash"] for t in self.tokens.values()):
            raise ConflictError("token exists")
        self.tokens[doc["_id"]] = doc
        return copy.deepcopy(doc)

    async def token_by_secret(self, token: str) -> dict[str, Any] | None:
        """The live token with this secret."""
        h = hash_token(token)
        return next(
            (copy.deepcopy(t) for t in self.tokens.values() if t["hash"] == h and not t["revoked"]),
            None,
        )
