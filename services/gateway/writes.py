"""A signal of this process's machine writes, for callers that wait on machines to settle.

Why: ``POST /v1/machines?wait`` used to read every machine of the batch five times a second,
and FerretDB v1 answers a read by many ids (``$in``) with a scan of every machine document: at
100 machines that polling cost the database more than the rest of the batch's work. A waiter
now looks at the summaries this process just wrote (the listing index, in memory) each time
:meth:`WriteSignal.wrote` fires, and reads the database only when those say it is done, or
every few seconds for writes made by another gateway replica.
"""

from __future__ import annotations

import asyncio

__all__ = ["WriteSignal"]


class WriteSignal:
    """A future that resolves at this process's next machine write, then is replaced."""

    def __init__(self) -> None:
        self._next: asyncio.Future[None] | None = None

    def next(self) -> asyncio.Future[None]:
        """Resolves at the next :meth:`wrote` (take it before looking, so no write is missed)."""
        if self._next is None or self._next.done():
            self._next = asyncio.get_running_loop().create_future()
        return self._next

    def wrote(self) -> None:
        """A machine (its summary) was just written: wake every waiter."""
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        self._next = None
