"""Retention: ended sessions and their casts are removed once they are older than the setting.

A bounded periodic job: each round reads the ended sessions past the retention (a projection,
one batch) and removes at most ``batch`` of them, oldest first: the cast file first, then the
record, so a crash between the two leaves a record without a cast (its recording answers 404,
and the next round removes it), never a cast no record points to. Live sessions are never
touched, however old, nor one whose cast is another bastion's (not under this one's state
dir). Two bastions on one database may prune at once: removing what is gone already is a
no-op. Empty day directories of the recordings are removed too.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path

import structlog
from prometheus_client import Counter

from libs.common.clock import utcnow

from ..domain import prunable
from ..store import BastionStore

__all__ = ["SessionPruner"]

log = structlog.get_logger("bastion.retention")

_PRUNED = Counter("dockvm_bastion_sessions_pruned_total", "Ended sessions removed by retention")


def _remove_cast(path: str | None, root: Path) -> None:
    """Remove a cast and its day directory when that is left empty (never outside ``root``)."""
    if not path:
        return
    cast = Path(path)
    with contextlib.suppress(FileNotFoundError):
        cast.unlink()
    day = cast.parent
    if day.parent == root:
        with contextlib.suppress(OSError):  # not empty (or gone): kept
            day.rmdir()


class SessionPruner:
    """Removes the sessions (and casts) that ended more than ``retention_s`` ago."""

    def __init__(
        self, store: BastionStore, recordings: Path, retention_s: float, batch: int = 1000
    ) -> None:
        self._store = store
        self._root = recordings
        self._retention_s = retention_s
        self._batch = batch

    async def prune(self) -> int:
        """One round; how many sessions it removed."""
        now = utcnow()
        ended = await self._store.ended_before(now - timedelta(seconds=self._retention_s))
        doomed = prunable(ended, now, self._retention_s, self._batch, self._root)
        if not doomed:
            return 0
        for doc in doomed:
            await asyncio.to_thread(_remove_cast, doc.get("recording_path"), self._root)
        removed = await self._store.delete_sessions([d["_id"] for d in doomed])
        _PRUNED.inc(removed)
        log.info("sessions past retention removed", count=removed, left=len(ended) - len(doomed))
        return removed
