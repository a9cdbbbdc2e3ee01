"""Request/reply over the bus, for queries that need an answer (pool usage, IP history).

Replies come back through RabbitMQ's Direct Reply-to: the client consumes the pseudo-queue
``amq.rabbitmq.reply-to`` (no-ack) on the channel it publishes requests from, and the broker
routes each reply straight to that channel. There is no reply queue to declare, so nothing has to
be re-declared when the robust connection comes back (an exclusive server-named reply queue cannot
be: its ``amq.gen-`` name is refused on reconnect). The robust channel restores the consumer
before it reports itself ready, and a request waits for that.

Delivery guarantee: at most once per call from the caller's view: a request that gets no reply
within the timeout raises :class:`TransientError` (a request in flight while the connection drops
is one of those); the callee's handler must be a read or idempotent. A request that no queue
takes (the service is not running) is returned by the broker and fails at once, also as a
:class:`TransientError`. A request the handler refuses (:class:`DomainError`) is answered with
``rpc.rejected`` and raised again here as the same family of error (404, 409, 422 or 400), with
the handler's reason and words.
"""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
from aio_pika.abc import (
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from pamqp.commands import Basic

from ..contracts.envelope import Envelope, Message, RequestRejected
from ..errors import ConflictError, DomainError, NotFoundError, TransientError, ValidationFailed
from .connection import open_channel
from .publisher import amqp_message
from .topology import EXCHANGE

__all__ = ["DIRECT_REPLY_TO", "NoTaker", "RpcClient", "rejection_error"]

_BY_STATUS: dict[int, type[DomainError]] = {
    404: NotFoundError,
    409: ConflictError,
    422: ValidationFailed,
}


def rejection_error(refusal: RequestRejected) -> DomainError:
    """The :class:`DomainError` a handler raised, rebuilt from its ``rpc.rejected`` answer."""
    cls = _BY_STATUS.get(refusal.status, DomainError)
    err = cls(refusal.detail or refusal.reason, reason=refusal.reason)
    if cls is DomainError:
        err.status = refusal.status if 400 <= refusal.status < 500 else 400
    return err


class NoTaker(TransientError):
    """No queue took the request: the service that answers it is not running."""

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


class RpcClient:
    """Sends commands with ``reply_to`` set and awaits the handler's returned message."""

    def __init__(self, connection: AbstractRobustConnection, source: str) -> None:
        self._connection = connection
        self._source = source
        self._channel: AbstractRobustChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._futures: dict[str, asyncio.Future[Envelope]] = {}
        self._lock = asyncio.Lock()

    async def _ready(self) -> AbstractExchange:
        async with self._lock:
            if self._channel is None or self._channel.is_closed or self._exchange is None:
                # Confirms: a request no queue takes comes back (mandatory) as the publish's
                # result, and the caller hears so at once instead of waiting out its timeout.
                channel = await open_channel(self._connection, publisher_confirms=True)
                # Declared (passively) through the robust channel so that it re-consumes the
                # pseudo-queue on every reopened channel; Direct Reply-to wants no-ack.
                replies = await channel.declare_queue(DIRECT_REPLY_TO, passive=True)
                await replies.consume(self._on_reply, no_ack=True)
                self._channel = channel  # type: ignore[assignment]
                self._exchange = await channel.get_exchange(EXCHANGE, ensure=False)
            channel, exchange = self._channel, self._exchange
        # After a reconnect, publishing before the consumer is back is refused by the broker
        # ("fast reply consumer does not exist"): wait for the channel's restore to finish.
        await channel.ready()
        return exchange

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
        env = Envelope.wrap(msg, source=self._source)
        corr = uuid.uuid4().hex
        fut: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._futures[corr] = fut
        amsg = amqp_message(env)
        amsg.reply_to = DIRECT_REPLY_TO
        amsg.correlation_id = corr
        amsg.delivery_mode = aio_pika.DeliveryMode.NOT_PERSISTENT
        try:
            async with asyncio.timeout(timeout):
                exchange = await self._ready()
                sent = await exchange.publish(amsg, routing_key=routing_key or env.type)
                if not isinstance(sent, Basic.Ack):
                    raise NoTaker(f"no service takes {env.type} requests: is it running?")
                reply = await fut
        except TimeoutError as err:
            raise TransientError(f"no reply to {env.type} within {timeout}s") from err
        except (
            aio_pika.exceptions.AMQPError,
            aio_pika.exceptions.ChannelInvalidStateError,
            OSError,
        ) as err:
            raise TransientError(f"request {env.type} not sent: {err!r}") from err
        finally:
            self._futures.pop(corr, None)
        answer = reply.parse()
        if isinstance(answer, RequestRejected):
            raise rejection_error(answer)
        return answer

    async def close(self) -> None:
        """Close the reply channel."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
