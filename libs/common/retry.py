"""tenacity policies for transient errors only, with exponential backoff, jitter and a cap."""

from __future__ import annotations

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from .errors import TransientError

__all__ = ["transient_retrying"]


def transient_retrying(
    attempts: int = 5, initial: float = 0.1, cap: float = 5.0, deadline: float = 60.0
) -> AsyncRetrying:
    """An ``AsyncRetrying`` that retries :class:`TransientError` and re-raises the last one."""
    return AsyncRetrying(
        retry=retry_if_exception_type(TransientError),
        wait=wait_exponential_jitter(multiplier=initial, max=cap),
        stop=stop_after_attempt(attempts) | stop_after_delay(deadline),
        reraise=True,
    )
