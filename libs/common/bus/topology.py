"""The bus topology, named once: one topic exchange, one dead-letter exchange, and a durable
quorum queue per consumer with a delivery limit and its own dead-letter queue.

A service only says which routing keys it consumes; queue arguments are derived here.
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

__all__ = [
    "DLX",
    "EXCHANGE",
    "QueueSpec",
    "declare_exchanges",
    "declare_queue",
    "dlq_name",
    "host_key",
    "queue_name",
]

EXCHANGE = "dockvm"
DLX = "dockvm.dlx"
DEFAULT_DELIVERY_LIMIT = 5


def queue_name(service: str, host_id: str | None = None) -> str:
    """``<service>`` or ``<service>.<host_id>`` for per-host agents."""
    return f"{service}.{host_id}" if host_id else service


def dlq_name(queue: str) -> str:
    """The dead-letter queue of ``queue``."""
    return f"{queue}.dlq"


def host_key(host_id: str, message_type: str) -> str:
    """The routing key of a command addressed to one host."""
    return f"host.{host_id}.{message_type}"


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A consumer's queue: its name and the routing keys (topic patterns) bound to it."""

    name: str
    bindings: tuple[str, ...]
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT

    def arguments(self) -> dict[str, object]:
        """The queue arguments RabbitMQ needs for a quorum queue with a DLQ."""
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": DLX,
            "x-dead-letter-routing-key": self.name,
        }


async def declare_exchanges(channel: AbstractChannel) -> tuple[AbstractExchange, AbstractExchange]:
    """Declare (idempotently) the main topic exchange and the dead-letter exchange."""
    main = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    dlx = await channel.declare_exchange(DLX, aio_pika.ExchangeType.TOPIC, durable=True)
    return main, dlx


async def declare_queue(channel: AbstractChannel, spec: QueueSpec) -> AbstractQueue:
    """Declare ``spec``'s queue, its DLQ and their bindings; return the main queue."""
    main, dlx = await declare_exchanges(channel)
    dlq = await channel.declare_queue(
        dlq_name(spec.name), durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dlq.bind(dlx, routing_key=spec.name)
    queue = await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments())
    for key in spec.bindings:
        await queue.bind(main, routing_key=key)
    return queue
