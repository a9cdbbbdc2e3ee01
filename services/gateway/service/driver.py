"""The saga driver: every machine operation as steps persisted on the machine's document.

A machine's ``saga`` field holds ``{op, step, attempt, deadline, params}``. Each step sends one
idempotent command (idempotent by machine_id on the receiving side) and waits for its result
event; ``tick`` re-sends a step whose deadline passed, up to ``step_attempts`` times, and then
does what the step's :class:`~.steps.StepSpec` says (a create is compensated: the IP released,
any partial container removed). Because the saga lives in MongoDB, a restarted gateway picks up
where the last one stopped (``resume``).

Delivery guarantee: at least once both ways. Commands may be sent more than once (re-sends and
resumes), and result events may arrive twice or late; every transition is conditional on the
state it expects, so a duplicate or late event changes nothing. A transition's
``machine.state_changed`` events, and the ``last_op`` of the operation it ends, are written in
the transition's own update (the machine's ``outbox``, see :mod:`..outbox`) and published from
there, so a publish that fails for good loses neither: the outbox relay sends them later.

The driver itself knows no operation: it reads the step table. The operations and their steps
(see :mod:`.create`, :mod:`.lifecycle`) are:

- create: ip → place → container (running)
- start/stop/restart: container
- resize: container
- destroy: container → ip (destroyed)
- migrate: export → import → finish, or → revert (see :mod:`.migrate`)
- compensate (after a failed create): container → ip, the machine stays failed

A new operation (a rolling deploy) registers its steps with :meth:`SagaDriver.register_step`
(what to send, how long to wait) and calls :meth:`SagaDriver.advance` from its result handlers;
re-sends, timeouts and resume then work for it unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from libs.common.bus import Publisher
from libs.common.clock import utcnow
from libs.common.contracts import gateway as gw
from libs.common.errors import ConflictError, DomainError, NotFoundError

from ..documents import LastOp, MachineDoc, OutboxEntry, SagaRecord
from ..domain import CREATE_TERMINAL
from ..outbox import OutboxRelay, outbox_entry
from ..settings import GatewaySettings
from ..store import MachineStore
from .create import CreateSaga
from .hosts import Hosts
from .lifecycle import Lifecycle
from .migrate import MigrateSaga
from .steps import SagaMatch, StepSpec, StepTable, new_op_id, saga_of, timeout_reason

__all__ = ["Clock", "SagaDriver"]

log = structlog.get_logger("gateway.sagas")
# Sagas re-sent at once at start; each is a write and a publish.
_RESUME_WIDTH = 16
# A create waiter looks at the summaries in memory at least this often (other replicas' writes
# reach them with the index's reload, which wakes nobody), reads the database this often in any
# case, and at most this often when memory says the batch is done but the database disagrees.
_LOOK_S = 1.0
_RECHECK_S = 5.0
_MIN_READ_GAP_S = 0.2


def _settled(doc: Any) -> bool:
    """A machine (or its summary) in a create-terminal state with no saga under way."""
    if doc is None:
        return False
    return doc.get("state") in CREATE_TERMINAL and not doc.get("saga") and not doc.get("pending")


class Clock(Protocol):
    """Port: the current time (a fake one lets unit tests move it)."""

    def __call__(self) -> datetime:
        """Now, UTC."""
        ...


class SagaDriver:
    """Starts, advances, re-sends, times out and resumes machine sagas, by the step table.

    The operations are its parts: :attr:`creates`, :attr:`lifecycle` and :attr:`hosts`; the bus
    handlers call them directly.
    """

    def __init__(
        self,
        store: MachineStore,
        publisher: Publisher,
        settings: GatewaySettings,
        clock: Clock = utcnow,
        outbox: OutboxRelay | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self.clock = clock
        # Publishes the events each transition writes into the machine's outbox.
        self.outbox = outbox or OutboxRelay(publisher, store, name="machines")
        self.steps = StepTable()
        self.creates = CreateSaga(self)
        self.lifecycle = Lifecycle(self)
        self.hosts = Hosts(self)
        self.migrations = MigrateSaga(self)
        self.creates.register(self.steps)
        self.lifecycle.register(self.steps)
        self.migrations.register(self.steps)

    def register_step(self, op: str, step: str, spec: StepSpec) -> None:
        """Add a step of a new operation (e.g. ``deploy``/``artifact``)."""
        self.steps.register(op, step, spec)

    # --- generic operations -----------------------------------------------------------------

    async def begin(
        self,
        machine_id: str,
        op: str,
        step: str,
        from_states: list[str],
        to_state: str,
        **params: Any,
    ) -> MachineDoc | None:
        """Start a registered operation on an idle machine; None if it was not in a from-state."""
        doc = await self.require(machine_id, idle=True)
        moved = await self.move(
            doc,
            from_states,
            to_state,
            set_={"state_before_op": doc["state"]},
            saga=self.saga(op, step, op_id=new_op_id(), **params),
        )
        if moved is not None:
            await self.send_step(moved)
        return moved

    async def advance(
        self,
        machine_id: str,
        op: str,
        from_step: str,
        to_step: str | None,
        *,
        ok: bool = True,
        reason: str | None = None,
    ) -> MachineDoc | None:
        """Move ``op`` past ``from_step``: to ``to_step`` (and send it), or finish it (None)."""
        doc = await self.store.get(machine_id)
        saga = (doc or {}).get("saga") or {}
        if doc is None or saga.get("op") != op or saga.get("step") != from_step:
            return None
        if to_step is None:
            back = doc.get("state_before_op") or doc["state"]
            return await self.move(
                doc, [doc["state"]], back, reason=reason, saga=None, ok=ok, why=reason
            )
        return await self.goto(
            machine_id,
            {"saga.op": op, "saga.step": from_step},
            self.saga(op, to_step, **(saga.get("params") or {})),
        )

    # --- building blocks of the operations --------------------------------------------------

    def saga(self, op: str, step: str, attempt: int = 1, **params: Any) -> SagaRecord:
        """A saga record for ``op`` at ``step`` with its deadline."""
        timeout_s = self.steps.get(op, step).timeout_s
        deadline = self.clock() + timedelta(seconds=timeout_s)
        return {"op": op, "step": step, "attempt": attempt, "deadline": deadline, "params": params}

    async def move(
        self,
        doc_or_id: MachineDoc | str,
        from_states: Iterable[str],
        to_state: str,
        *,
        ok: bool | None = None,
        why: str | None = None,
        detail: str = "",
        **kw: Any,
    ) -> MachineDoc | None:
        """Transition the machine (see the store) with an event for each change (one per state
        of ``via`` too) in the same write, then publish them; None if it was not in one of
        ``from_states``. With ``ok``, the write also records that the operation in progress
        ended (``last_op``: ok or not, ``why`` and ``detail``), which the API's waiters read."""
        doc = await self.store.get(doc_or_id) if isinstance(doc_or_id, str) else doc_or_id
        if doc is None:
            return None
        set_ = dict(kw.pop("set_", None) or {})
        if ok is not None:
            set_["last_op"] = self.last_op(doc, ok, why, detail)
        states = [doc.get("state"), *(str(s) for s in kw.get("via", ())), to_state]
        after = {**doc, "reason": kw.get("reason"), **set_}
        moved = await self.store.transition(
            doc["_id"],
            [str(s) for s in from_states],
            to_state,
            set_=set_,
            outbox=self.state_events(after, states),
            **kw,
        )
        if moved is not None:
            await self.publish_outbox(moved)
        return moved

    def state_events(self, after: MachineDoc, states: list[str | None]) -> list[OutboxEntry]:
        """The outbox entries announcing that the machine went through ``states`` (the first is
        where it was), as ``after`` (the machine once written) shows it."""
        at = self.clock()
        return [
            outbox_entry(
                gw.MachineStateChanged(
                    machine_id=after["_id"],
                    app=after["app"],
                    type=after["type"],
                    from_state=states[i - 1],
                    to_state=states[i],
                    reason=after.get("reason") if i == len(states) - 1 else None,
                    host=after.get("host"),
                    ip=after.get("ip"),
                    at=at,
                )
            )
            for i in range(1, len(states))
        ]

    async def publish_outbox(self, written: MachineDoc) -> None:
        """Publish what the write left in the machine's outbox, at once; best effort (what
        fails is left to the relay's tick)."""
        await self.outbox.flush(written["_id"], written.get("outbox") or [])

    async def goto(self, machine_id: str, match: SagaMatch, saga: SagaRecord) -> MachineDoc | None:
        """Put the machine's saga at ``saga`` if it still matches ``match``, and send the step."""
        moved = await self.store.update(machine_id, match, {"saga": saga})
        if moved is not None:
            await self.send_step(moved)
        return moved

    def last_op(
        self, doc: MachineDoc, ok: bool, reason: str | None = None, detail: str = ""
    ) -> LastOp:
        """How the operation in progress on ``doc`` ended, as ``last_op`` records it."""
        saga = doc.get("saga") or {}
        return {
            "id": (saga.get("params") or {}).get("op_id"),
            "op": saga.get("op"),
            "ok": ok,
            "reason": reason,
            "detail": detail,
            "at": self.clock(),
        }

    async def send_step(self, doc: MachineDoc) -> None:
        """Send the command of the machine's current saga step."""
        saga = saga_of(doc)
        await self.steps.get(saga["op"], saga["step"]).send(doc)

    async def require(self, machine_id: str, *, idle: bool = False) -> MachineDoc:
        """The machine; NotFoundError if there is none, ConflictError if ``idle`` and busy."""
        doc = await self.store.get(machine_id)
        if doc is None:
            raise NotFoundError(f"no machine {machine_id}", reason="machine_not_found")
        if idle and doc.get("saga"):
            raise ConflictError(
                f"{machine_id} is busy with {doc['saga']['op']}", reason="machine_busy"
            )
        return doc

    # --- timeouts and resume ----------------------------------------------------------------

    async def tick(self) -> int:
        """Re-send or fail every step past its deadline; return how many were handled."""
        due = await self.store.due_sagas(self.clock())
        for doc in due:
            try:
                await self._on_due(doc)
            except DomainError as err:
                log.warning("saga step could not be re-sent", machine_id=doc["_id"], error=str(err))
        return len(due)

    async def _on_due(self, doc: MachineDoc) -> None:
        saga = saga_of(doc)
        match = {"saga.op": saga["op"], "saga.step": saga["step"], "saga.attempt": saga["attempt"]}
        spec = self.steps.find(saga["op"], saga["step"])
        if spec is not None and saga["attempt"] < self.settings.step_attempts:
            params = saga.get("params") or {}
            nxt = self.saga(saga["op"], saga["step"], saga["attempt"] + 1, **params)
            log.info(
                "saga step re-sent",
                machine_id=doc["_id"],
                op=saga["op"],
                step=saga["step"],
                attempt=nxt["attempt"],
            )
            await self.goto(doc["_id"], match, nxt)
            return
        log.warning("saga step timed out", machine_id=doc["_id"], op=saga["op"], step=saga["step"])
        if spec is not None and spec.on_exhausted is not None:
            await spec.on_exhausted(doc, match)
            return
        back = (spec.on_timeout_state if spec else None) or doc.get("state_before_op")
        await self.move(
            doc,
            [doc["state"]],
            back or doc["state"],
            reason=timeout_reason(saga),
            saga=None,
            ok=False,
            why="timeout",
        )

    async def resume(self) -> int:
        """At start: re-send the current step of every saga in flight; return how many."""
        docs = await self.store.in_flight()
        # Machines are independent (each has its own lock), and a start with many sagas in
        # flight must not keep the gateway unready: re-send them side by side, a bounded few.
        gate = asyncio.Semaphore(_RESUME_WIDTH)

        async def resume_one(doc: MachineDoc) -> None:
            if doc.get("saga") is None:
                return
            async with gate:
                try:
                    await self.send_step(doc)
                except DomainError as err:
                    log.warning("saga not resumed", machine_id=doc["_id"], error=str(err))

        await asyncio.gather(*(resume_one(doc) for doc in docs))
        if docs:
            log.info("sagas resumed", count=len(docs))
        return len(docs)

    # --- what the API calls -----------------------------------------------------------------

    @staticmethod
    def new_ids(count: int) -> list[str]:
        """``count`` fresh machine ids."""
        return CreateSaga.new_ids(count)

    async def create(self, spec: dict[str, Any], ids: list[str]) -> list[MachineDoc]:
        """Store the machines (existing ids are kept) and start their create sagas."""
        return await self.creates.create(spec, ids)

    async def begin_action(self, machine_id: str, action: str) -> tuple[MachineDoc, str]:
        """Start a start/stop/restart; return the machine and the operation id."""
        return await self.lifecycle.begin_action(machine_id, action)

    async def begin_resize(
        self, machine_id: str, cpus: float | None, memory: int | None, disk: int | None, force: bool
    ) -> tuple[MachineDoc, str]:
        """Start a live resize; a disk shrink is refused at once."""
        return await self.lifecycle.begin_resize(machine_id, cpus, memory, disk, force)

    async def begin_destroy(self, machine_id: str) -> MachineDoc:
        """Start a destroy: the container (if any), then the IP."""
        return await self.lifecycle.begin_destroy(machine_id)

    async def wait_terminal(self, ids: list[str], timeout: float) -> list[MachineDoc]:
        """Wait until every machine is in a create-terminal state with no saga, or ``timeout``
        passes; return the machines as stored.

        The database is read when the summaries in memory say every machine is done (this
        process's writes wake the waiter; other replicas' arrive with the index's reload), and
        every ``_RECHECK_S`` in any case (services/gateway/writes.py says why): a read of many
        ids scans every machine on FerretDB v1."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pending, last_read = list(ids), -_RECHECK_S
        while True:
            wrote = self.store.writes.next()
            pending = [m for m in pending if not _settled(self.store.written(m))]
            now = loop.time()
            gap = _MIN_READ_GAP_S if not pending else _RECHECK_S
            if now - last_read >= gap or now >= deadline:
                docs = await self.store.by_ids(ids)
                last_read = loop.time()
                pending = [d["_id"] for d in docs if not _settled(d)]
                if not pending or last_read >= deadline:
                    return docs
                continue
            wake = min(last_read + gap, now + _LOOK_S, deadline) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(wrote), wake)

    async def wait_op(self, machine_id: str, op_id: str, timeout: float) -> LastOp | None:
        """Poll until the operation ``op_id`` ended; return ``last_op`` (None on timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            doc = await self.store.get(machine_id)
            last = (doc or {}).get("last_op") or {}
            if last.get("id") == op_id:
                return last
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.1)
