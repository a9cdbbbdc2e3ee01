"""The one clock: UTC time at millisecond precision, which is what BSON stores.

Every timestamp that is stored, compared with a stored one, or put on the bus comes from here, so
a value read back from MongoDB equals the value that was written.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["utcnow"]


def utcnow() -> datetime:
    """The current time, UTC, truncated to the millisecond."""
    t = datetime.now(UTC)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)
