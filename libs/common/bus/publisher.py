"""Publishing: envelopes go out persistent, and each publish waits for the broker's confirm.

Delivery guarantee: when :meth:`AmqpPublisher.publish` returns, RabbitMQ has taken
responsibility for the message (publisher confirm). A transient failure is retried with
backoff; if it persists the caller gets a :class:`TransientError` and must not assume the
message went out.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from ..contracts.envelope import Envelope, Message
from ..errors import TransientError
from ..retry import transient_retrying
from .connection import open_channel
from .topology import DLX, EXCHANGE, declare_exchanges

__all__ = ["AmqpPublisher", "Publisher", "amqp_message"]


class Publisher(Protocol):
    """Port: put a message on the bus."""

    async def publish(
        self,
        msg: Message,
        *,
        routing_key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        id: str | None = None,
    ) -> Envelope:
        """Publish ``msg`` (routing key defaults to its type); return the envelope sent."""
        ...


def amqp_message(env: Envelope, headers: dict | None = None) -> aio_pika.Message:
    """The AMQP message for ``env``: persistent JSON with id, type and correlation set."""
    return aio_pika.Message(
        env.to_bytes(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=env.id,
        type=env.type,
        correlation_id=env.correlation_id,
        # No AMQP timestamp or empty header table: the envelope carries occurred_at, and
        # encoding extra properties costs more per message than the JSON body.
        headers=headers or None,
    )


class AmqpPublisher:
    """Publishes on the ``dockvm`` exchange with publisher confirms."""

    def __init__(self, connection: AbstractRobustConnection, source: str) -> None:
        self._connection = connection
        self._source = source
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._lock = asyncio.Lock()

    async def _ready(self) -> tuple[AbstractExchange, AbstractExchange]:
        channel, exchange, dlx = self._channel, self._exchange, self._dlx
        if channel is not None and not channel.is_closed and exchange and dlx:
            return exchange, dlx  # the hot path takes no lock
        async with self._lock:
            if self._exchange is None or self._channel is None or self._channel.is_closed:
                self._channel = await open_channel(self._connection, publisher_confirms=True)
                self._exchange, self._dlx = await declare_exchanges(self._channel)
            assert self._dlx is not None
            return self._exchange, self._dlx

    async def publish(
        self,
        msg: Message,
        *,
        routing_key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        id: str | None = None,
    ) -> Envelope:
        """Publish ``msg`` and wait for the broker's confirm."""
        env = Envelope.wrap(
            msg,
            source=self._source,
            correlation_id=correlation_id,
            causation_id=causation_id,
            id=id,
        )
        await self.publish_envelope(env, routing_key=routing_key or env.type)
        return env

    async def publish_envelope(
        self, env: Envelope, *, routing_key: str, headers: dict | None = None, dead: bool = False
    ) -> None:
        """Publish a ready envelope (to the DLX when ``dead``), retrying transient failures."""
        try:
            # First attempt outside tenacity: building a retry controller per message costs
            # more than the publish itself on the hot path.
            await self._publish_once(env, routing_key, headers, dead)
            return
        except TransientError:
            pass
        async for attempt in transient_retrying(attempts=5, deadline=30):
            with attempt:
                await self._publish_once(env, routing_key, headers, dead)

    async def _publish_once(
        self, env: Envelope, routing_key: str, headers: dict | None, dead: bool
    ) -> None:
        try:
            exchange, dlx = await self._ready()
            await (dlx if dead else exchange).publish(
                amqp_message(env, headers), routing_key=routing_key
            )
        except (
            aio_pika.exceptions.AMQPError,
            # A channel closed under us while the robust connection reconnects (a RuntimeError
            # in aiormq, not an AMQPError): the next attempt gets a new one.
            aio_pika.exceptions.ChannelInvalidStateError,
            OSError,
            TimeoutError,
        ) as err:
            raise TransientError(f"publish of {env.type} failed: {err!r}") from err

    async def publish_raw(
        self, body: bytes, *, routing_key: str, exchange: str = EXCHANGE, **props: object
    ) -> None:
        """Publish raw bytes (used for replies and for dead-lettering unparseable bodies)."""
        exchange_obj, dlx = await self._ready()
        target = dlx if exchange == DLX else exchange_obj
        if exchange == "":
            assert self._channel is not None
            target = self._channel.default_exchange
        await target.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props),  # type: ignore[arg-type]
            routing_key=routing_key,
            timeout=10,
        )

    async def close(self) -> None:
        """Close the publishing channel."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
