"""Request/reply over the bus, for queries that need an answer (pool usage, IP history).

Delivery guarantee: at most once per call from the caller's view: a request that gets no reply
within the timeout raises :class:`TransientError`; the callee's handler must be a read or
idempotent.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from ..contracts.envelope import Envelope, Message
from ..errors import TransientError
from .publisher import amqp_message
from .topology import EXCHANGE

__all__ = ["RpcClient"]


class RpcClient:
    """Sends commands with ``reply_to`` set and awaits the handler's returned message."""

    def __init__(self, connection: AbstractRobustConnection, source: str) -> None:
        self._connection = connection
        self._source = source
        self._channel: AbstractChannel | None = None
        self._reply_queue: str | None = None
        self._futures: dict[str, asyncio.Future[Envelope]] = {}
        self._lock = asyncio.Lock()

    async def _ready(self) -> AbstractChannel:
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(publisher_confirms=False)
                queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
                await queue.consume(self._on_reply, no_ack=True)
                self._reply_queue = queue.name
            return self._channel

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._futures.pop(message.correlation_id or "", None)
        if fut is not None and not fut.done():
            try:
                fut.set_result(Envelope.from_bytes(message.body))
            except Exception as err:
                fut.set_exception(err)

    async def request(
        self, msg: Message, *, routing_key: str | None = None, timeout: float = 10.0
    ) -> Message:
        """Send ``msg`` and return the parsed reply."""
        channel = await self._ready()
        env = Envelope.wrap(msg, source=self._source)
        corr = uuid.uuid4().hex
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._futures[corr] = fut
        amsg = amqp_message(env)
        amsg.reply_to = self._reply_queue
        amsg.correlation_id = corr
        amsg.delivery_mode = aio_pika.DeliveryMode.NOT_PERSISTENT
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        try:
            await exchange.publish(amsg, routing_key=routing_key or env.type)
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError as err:
            raise TransientError(f"no reply to {env.type} within {timeout}s") from err
        finally:
            self._futures.pop(corr, None)
        return reply.parse()

    async def close(self) -> None:
        """Close the reply channel."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
