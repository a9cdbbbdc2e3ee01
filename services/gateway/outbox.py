"""The transactional outbox: events written with the state change they announce, then relayed.

A saga that moves a machine (or ends a release) does not publish its events after the write: it
puts them in the document's ``outbox`` list in the same update as the change (one
``find_one_and_update``), each entry with its own id. :class:`OutboxRelay` publishes them at
once after the write (in the same task, best effort), and its periodic
:meth:`~OutboxRelay.tick` publishes what failed (the broker gone for good) or what a crash left
between the write and the publish, and clears what went out. So a state change and its event
cannot part: if the write happened, its events go out sooner or later, and ``last_op`` (the
API's ``?wait``) is in the same write.

The clear waits for the tick (every ``saga_tick_s``), one write per document for everything
published since: on FerretDB v1 a clear costs about what the transition itself costs, and
in the saga's own task it doubled the time of every transition (median 396 ms against 178 ms
for a transition and its publish, on a loaded machine). An entry published and not yet cleared
is never sent again by this process; after a crash it is, under the same id.

Delivery guarantee: at least once, in the order written per document. The envelope's id is the
entry's stored id, so a re-publish (the clear failed, a crash after the publish, two replicas'
relays) is a duplicate that consumers deduping on message id (``libs.common.bus.dedupe``) see as
one. A document's entries are published in order and a failure stops that document's flush, so
a later event never overtakes an earlier one of the same machine.

How it copes with FerretDB v1 (every update matches, then writes the whole document by ``_id``,
so a concurrent write to the same document can be lost):

- the events ride in the state change's own update, never in a second write;
- a clear removes only the published entries, with ``$pullAll`` of the entries exactly as they
  were read back (FerretDB v1's ``$pull`` ignores a condition such as ``{id: {$in: ...}}`` and
  silently removes nothing); an entry written since is left for the next flush;
- the store runs a clear under the same per-document lock as its other writes to that document
  (the machine lock of :class:`~services.gateway.store.GatewayStore`, the release lock of
  :class:`~services.gateway.store.ReleaseStore`), so within a process it cannot erase a state
  change. Across replicas on FerretDB the window remains, as for every machine write: run
  several replicas on a real MongoDB. Lost the other way (a clear erased by a concurrent
  write), an entry is published again under the same id: a duplicate, not a loss;
- the periodic scan (``outbox.0`` exists) reads every document, as FerretDB v1 pushes no filter
  down: it runs at start and every ``scan_every_s``; in between, the tick reads by ``_id`` only
  the documents whose flush failed in this process.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import structlog

from libs.common.bus import Publisher
from libs.common.contracts.envelope import Message, message_model
from libs.common.errors import DomainError

from .documents import OutboxEntry

__all__ = ["OutboxRelay", "OutboxStore", "outbox_entry"]

log = structlog.get_logger("gateway.outbox")

# Ids published by this process, remembered so a flush racing the tick does not send one twice.
_REMEMBERED = 10_000


def outbox_entry(
    msg: Message, *, routing_key: str | None = None, id: str | None = None
) -> OutboxEntry:
    """An outbox entry for ``msg``: its id (the envelope's id when published), type and data."""
    entry: OutboxEntry = {
        "id": id or uuid.uuid4().hex,
        "type": msg.TYPE,
        "version": msg.VERSION,
        # JSON values only: what is read back must equal what was written, for $pullAll.
        "data": msg.model_dump(mode="json"),
    }
    if routing_key is not None:
        entry["routing_key"] = routing_key
    return entry


class OutboxStore(Protocol):
    """Port: the documents that hold outboxes (machines, releases)."""

    async def pending_outboxes(self, ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Documents (``_id``, ``outbox``) with entries to publish; only ``ids`` if given."""
        ...

    async def clear_outbox(self, doc_id: str, entries: list[OutboxEntry]) -> None:
        """Remove exactly these entries (as read back) from the document's outbox."""
        ...


class OutboxRelay:
    """Publishes the outbox entries of one kind of document, and clears what went out."""

    def __init__(
        self,
        publisher: Publisher,
        store: OutboxStore,
        *,
        name: str = "machines",
        scan_every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._publisher = publisher
        self._store = store
        self.name = name
        self._scan_every = scan_every_s
        self._clock = clock
        self._next_scan = float("-inf")  # the first tick scans: what a crash left
        self._failed: set[str] = set()
        self._sent: OrderedDict[str, None] = OrderedDict()
        # Published (or dropped) entries, as read back, that the next tick clears.
        self._to_clear: dict[str, dict[str, OutboxEntry]] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def _lock(self, doc_id: str) -> asyncio.Lock:
        lock = self._locks.get(doc_id)
        if lock is None:
            lock = self._locks[doc_id] = asyncio.Lock()
        return lock

    def _remember(self, entry_id: str) -> None:
        self._sent[entry_id] = None
        while len(self._sent) > _REMEMBERED:
            self._sent.popitem(last=False)

    async def flush(self, doc_id: str, entries: list[OutboxEntry]) -> bool:
        """Publish ``entries`` (as the write returned them) in order and queue what went out
        for the tick to clear; never raises. False when something is left to publish."""
        if not entries:
            return True
        async with self._lock(doc_id):
            published = await self._publish_in_order(doc_id, entries)
            queued = self._to_clear.setdefault(doc_id, {})
            gone = [e for e in entries if e["id"] in self._sent or e["id"] in published]
            queued.update((e["id"], e) for e in gone)
            if len(gone) < len(entries):
                self._failed.add(doc_id)
                return False
            return True

    async def _publish_in_order(self, doc_id: str, entries: list[OutboxEntry]) -> set[str]:
        """Publish the entries not yet sent, stopping at the first failure; the ids sent, and
        the ids of entries that can never be sent (dropped, so they block nothing)."""
        done: set[str] = set()
        queued = self._to_clear.get(doc_id) or {}
        for entry in entries:
            if entry["id"] in self._sent or entry["id"] in queued:
                continue
            try:
                msg = message_model(entry["type"], entry.get("version", 1)).model_validate(
                    entry["data"]
                )
            except (DomainError, ValueError) as err:
                # A type this version does not know (written by a newer gateway, or corrupt).
                log.error("outbox entry dropped", kind=self.name, entry=entry, error=repr(err))
                done.add(entry["id"])
                continue
            try:
                await self._publisher.publish(
                    msg, routing_key=entry.get("routing_key"), id=entry["id"]
                )
            except Exception as err:  # the broker is gone: leave it (and what follows) for later
                log.warning(
                    "outbox publish failed; left for the relay's tick",
                    kind=self.name,
                    doc_id=doc_id,
                    type=entry["type"],
                    error=repr(err),
                )
                break
            self._remember(entry["id"])
            done.add(entry["id"])
        return done

    async def tick(self) -> int:
        """Publish what a failed flush left in this process and, at start and every
        ``scan_every_s``, what any document holds; then clear what went out. Return how many
        documents had something to publish."""
        flushed = await self._republish()
        await self._clear_published()
        return flushed

    async def _republish(self) -> int:
        now = self._clock()
        scan = now >= self._next_scan
        ids, self._failed = self._failed, set()
        if not scan and not ids:
            return 0
        try:
            docs = await self._store.pending_outboxes(None if scan else ids)
        except Exception:
            self._failed |= ids
            raise
        if scan:
            self._next_scan = now + self._scan_every
        flushed = 0
        for doc in docs:
            if self._lock(doc["_id"]).locked():
                # A flush of it is under way (right after its write): it reports its own result.
                continue
            entries = doc.get("outbox") or []
            queued = self._to_clear.get(doc["_id"]) or {}
            if any(e["id"] not in queued for e in entries):
                flushed += 1
            await self.flush(doc["_id"], entries)
        return flushed

    async def _clear_published(self) -> None:
        """Remove what went out from each document's outbox: one write per document."""
        for doc_id in list(self._to_clear):
            entries = self._to_clear.pop(doc_id)
            if not entries:
                continue
            try:
                await self._store.clear_outbox(doc_id, list(entries.values()))
            except Exception as err:  # the next tick tries again; nothing is sent twice
                log.warning("outbox clear failed", kind=self.name, doc_id=doc_id, error=repr(err))
                self._to_clear.setdefault(doc_id, {}).update(entries)

    @property
    def failed(self) -> frozenset[str]:
        """Documents whose last flush left something (what the next tick retries)."""
        return frozenset(self._failed)
