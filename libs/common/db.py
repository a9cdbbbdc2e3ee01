"""MongoDB access through PyMongo's async API, limited to what MongoDB and FerretDB v1 both serve.

That is CRUD, ``find_one_and_update``, unique and compound indexes, and simple aggregation.
No transactions, change streams or TTL indexes: uniqueness is enforced by unique indexes and
retention is an explicit job.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from pymongo import AsyncMongoClient, IndexModel
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError, PyMongoError

from .errors import ConflictError, TransientError

__all__ = [
    "DatabaseUnavailable",
    "conflict_on_duplicate",
    "ensure_indexes",
    "mongo_client",
    "ping",
]


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
