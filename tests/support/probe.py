"""A test-side listener on the bus: bind a temporary queue, then wait for matching messages."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from libs.common.bus import EXCHANGE
from libs.common.contracts import Envelope, Message


class BusProbe:
    """Collects every envelope published with a routing key matching ``bindings``."""

    def __init__(self, connection: AbstractRobustConnection, bindings: list[str]) -> None:
        self._connection = connection
        self._bindings = bindings
        self.received: list[tuple[str, Envelope]] = []
        self._changed = asyncio.Condition()
        self._channel: AbstractChannel | None = None

    async def start(self) -> BusProbe:
        """Declare the exchange and an exclusive queue bound to the patterns."""
        self._channel = await self._connection.channel()
        exchange = await self._channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        for key in self._bindings:
            await queue.bind(exchange, routing_key=key)
        await queue.consume(self._on_message, no_ack=True)
        return self

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        env = Envelope.from_bytes(message.body)
        async with self._changed:
            self.received.append((message.routing_key or "", env))
            self._changed.notify_all()

    def of_type(self, type_: str) -> list[Message]:
        """Parsed messages of ``type_`` received so far."""
        return [env.parse() for _, env in self.received if env.type == type_]

    async def wait_for(
        self,
        type_: str,
        where: Callable[[Message], bool] = lambda _: True,
        timeout: float = 30.0,
        count: int = 1,
    ) -> list[Message]:
        """Wait until ``count`` messages of ``type_`` matching ``where`` arrived; return them."""

        def matching() -> list[Message]:
            return [m for m in self.of_type(type_) if where(m)]

        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(lambda: len(matching()) >= count)
        return matching()

    async def close(self) -> None:
        """Close the probe's channel."""
        if self._channel is not None:
            await self._channel.close()
