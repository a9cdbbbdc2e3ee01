"""The two error families of dockvm, and the one place library errors are translated.

A :class:`DomainError` (bad input, a conflict, an exhausted pool) is final: it is rejected,
never retried, and surfaces as a failure event or a 4xx. A :class:`TransientError`
(connection refused, timeout, 5xx) is retried with tenacity and requeued if it persists.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

__all__ = [
    "ConflictError",
    "DomainError",
    "NotFoundError",
    "TransientError",
    "ValidationFailed",
    "translate_errors",
]


class DockvmError(Exception):
    """Base of every error dockvm raises on purpose."""


class DomainError(DockvmError):
    """Final: the request cannot succeed as asked. ``reason`` is a stable machine-readable code."""

    reason = "domain_error"
    status = 400

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        """The human-readable explanation."""
        return str(self)


class ValidationFailed(DomainError):
    """Input that does not fit its schema or rules."""

    reason = "invalid"
    status = 422


class ConflictError(DomainError):
    """The request conflicts with existing state (a duplicate, a taken address)."""

    reason = "conflict"
    status = 409


class NotFoundError(DomainError):
    """The named thing does not exist."""

    reason = "not_found"
    status = 404


class TransientError(DockvmError):
    """Worth retrying: the outside world did not answer, or answered with a 5xx."""


# MongoDB's codes for a server that is shutting down or stepping down, and the text FerretDB's
# SQLite backend answers with when a write waited too long for the database lock.
_BUSY_CODES = frozenset({91, 189, 10107, 11600, 11602, 13435, 13436})
_BUSY_TEXT = ("database is locked", "SQLITE_BUSY")


def _busy(err: Exception) -> bool:
    code = getattr(err, "code", None)
    labels = getattr(err, "has_error_label", None)
    if code in _BUSY_CODES or (labels is not None and labels("RetryableWriteError")):
        return True
    return any(text in str(err) for text in _BUSY_TEXT)


def _translate(err: BaseException) -> DockvmError | None:
    # Imports are local so that this module stays importable by pure unit tests.
    import aiohttp
    import aiormq.exceptions
    import docker.errors
    import pymongo.errors

    if isinstance(err, DockvmError):
        return None
    if isinstance(err, pymongo.errors.DuplicateKeyError):
        return ConflictError(f"duplicate key: {err.details or err}")
    if isinstance(
        err,
        pymongo.errors.AutoReconnect
        | pymongo.errors.ServerSelectionTimeoutError
        | pymongo.errors.NetworkTimeout
        | pymongo.errors.ConnectionFailure,
    ):
        return TransientError(f"database unavailable: {err}")
    if isinstance(err, pymongo.errors.OperationFailure) and _busy(err):
        return TransientError(f"database busy: {err}")
    if isinstance(err, docker.errors.ImageNotFound | docker.errors.NotFound):
        return NotFoundError(str(err.explanation if hasattr(err, "explanation") else err))
    if isinstance(err, docker.errors.APIError):
        code = err.status_code or 500
        if code >= 500:
            return TransientError(f"docker engine error: {err.explanation or err}")
        if code == 409:
            return ConflictError(f"docker: {err.explanation or err}")
        return DomainError(f"docker: {err.explanation or err}", reason="docker_rejected")
    if isinstance(err, aiohttp.ClientResponseError):
        if err.status >= 500 or err.status == 429:
            return TransientError(f"HTTP {err.status}: {err.message}")
        return DomainError(f"HTTP {err.status}: {err.message}", reason="http_rejected")
    if isinstance(err, aiohttp.ClientConnectionError | aiormq.exceptions.AMQPConnectionError):
        return TransientError(f"connection failed: {err}")
    if isinstance(err, TimeoutError | asyncio.TimeoutError | ConnectionError):
        return TransientError(f"timed out or connection lost: {err!r}")
    return None


P = ParamSpec("P")
R = TypeVar("R")


def translate_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a sync or async function so library errors leave it as dockvm errors."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return await fn(*args, **kwargs)
            except Exception as err:
                mapped = _translate(err)
                if mapped is None:
                    raise
                raise mapped from err

        return async_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            mapped = _translate(err)
            if mapped is None:
                raise
            raise mapped from err

    return wrapper  # type: ignore[return-value]
