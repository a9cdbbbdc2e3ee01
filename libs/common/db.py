"""MongoDB access through PyMongo's async API, limited to what MongoDB and FerretDB v1 both serve.

That is CRUD, ``find_one_and_update``, unique and compound indexes, and simple aggregation.
No transactions, change streams or TTL indexes: uniqueness is enforced by unique indexes and
retention is an explicit job.

Reads that may return more than 101 documents go through :func:`read_all` (one batch). A
find's first batch holds 101 documents by default; the rest comes by ``getMore``, and until the
cursor is exhausted or killed FerretDB v1 keeps one of its SQLite connections (100 per
database) for it. Many such cursors at once (100 placements each reading a dc's machines)
took all 100; their ``getMore`` then waited for a client connection held by a write that
waited for an SQLite connection, and FerretDB never recovered (every later query on that
database hung, even after the clients left). Even ``limit(101)`` leaves a cursor open for a
``killCursors``. With a batch size above the result, the first reply carries everything and
cursor id 0, so FerretDB frees its connection before it answers. A batch is still capped at
16 MiB by the server; past that the read continues by ``getMore`` as usual.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from pymongo import AsyncMongoClient, IndexModel
from pymongo.asynchronous.cursor import AsyncCursor
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from .errors import ConflictError, TransientError

__all__ = [
    "ONE_BATCH",
    "DatabaseUnavailable",
    "conflict_on_duplicate",
    "ensure_indexes",
    "mongo_client",
    "ping",
    "read_all",
]

# Larger than any result we read, so the first reply holds it all (see the module docstring).
ONE_BATCH = 1_000_000


class DatabaseUnavailable(TransientError):
    """The MongoDB API did not answer."""


def mongo_client(url: str, app_name: str, timeout_ms: int = 5000) -> AsyncMongoClient:
    """A client with timezone-aware datetimes and bounded timeouts (it connects lazily)."""
    return AsyncMongoClient(
        url,
        appname=app_name,
        tz_aware=True,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        retryWrites=False,  # FerretDB v1 has no retryable writes
    )


async def read_all(cursor: AsyncCursor[Any]) -> list[Any]:
    """Every document of ``cursor``, fetched in one batch so no server cursor stays open."""
    return await cursor.batch_size(ONE_BATCH).to_list()


async def ping(db: AsyncDatabase) -> None:
    """Raise :class:`DatabaseUnavailable` unless the server answers ``ping``."""
    try:
        await db.command("ping")
    except PyMongoError as err:
        raise DatabaseUnavailable(
            f"the MongoDB API is not reachable ({err.__class__.__name__}); "
            "start the local stack with `make run` or set DOCKVM_MONGO_URL"
        ) from err


async def ensure_indexes(db: AsyncDatabase, indexes: Mapping[str, Sequence[IndexModel]]) -> None:
    """Create each collection's indexes (idempotent; run at service start)."""
    for collection, models in indexes.items():
        # One index per command: FerretDB v1 drops the connection when a multi-index
        # createIndexes names indexes that already exist (i.e. on every restart).
        for model in models:
            await db[collection].create_indexes([model])


@asynccontextmanager
async def conflict_on_duplicate(what: str, **context: Any) -> AsyncIterator[None]:
    """Turn a duplicate-key error in the block into a :class:`ConflictError` about ``what``."""
    try:
        yield
    except DuplicateKeyError as err:
        detail = ", ".join(f"{k}={v}" for k, v in context.items())
        raise ConflictError(f"{what} already exists" + (f" ({detail})" if detail else "")) from err
