"""One robust AMQP connection per process, named so RabbitMQ's tools can tell them apart."""

from __future__ import annotations

import logging

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from ..errors import TransientError

__all__ = ["BusUnavailable", "connect", "open_channel"]


class BusUnavailable(TransientError):
    """RabbitMQ did not answer at start."""


async def connect(url: str, name: str, timeout: float = 10.0) -> AbstractRobustConnection:
    """Open a robust connection named ``name``; a dead broker raises :class:`BusUnavailable`."""
    # The first connect reports its own failure as one clear line; aiormq's traceback-level
    # log of the same refusal would only repeat it.
    aiormq_log = logging.getLogger("aiormq.connection")
    previous = aiormq_log.level
    aiormq_log.setLevel(logging.CRITICAL)
    try:
        return await aio_pika.connect_robust(
            url, timeout=timeout, client_properties={"connection_name": name}
        )
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as err:
        raise BusUnavailable(
            f"RabbitMQ is not reachable at {_redact(url)} ({err.__class__.__name__}: {err}); "
            "start the local stack with `make run` or set DOCKVM_AMQP_URL"
        ) from err
    finally:
        aiormq_log.setLevel(previous)


async def open_channel(
    connection: AbstractRobustConnection, *, publisher_confirms: bool
) -> aio_pika.abc.AbstractChannel:
    """A new channel; while the robust connection is down (reconnecting) a
    :class:`TransientError` (aio-pika raises a plain ``RuntimeError`` there), so that callers
    retry and the API answers 503 rather than 500."""
    try:
        return await connection.channel(publisher_confirms=publisher_confirms)
    except RuntimeError as err:
        # Every RuntimeError of channel() is the connection's state: aio-pika's "not opened"
        # while it reconnects, or aiormq's "<Connection ...> closed" when the drop is not yet
        # seen by the robust connection (the chaos suite's RabbitMQ restart hit both).
        raise TransientError(f"the broker connection is down: {err}") from err


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
