"""The one consumer wrapper: it makes the ack semantics of every dockvm consumer explicit.

Delivery guarantee: at least once. For each delivery the wrapper
1. parses the envelope and validates ``data`` into the registered model;
2. skips (acks) a message id this consumer already handled (idempotent consumer);
3. calls the handler, and acks only after it returns, so its effect is durable first.

Outcomes: a malformed message, an unknown type or a :class:`DomainError` is dead-lettered at
once with the reason in the ``x-dockvm-reason`` header, never retried. A
:class:`TransientError` (or an unexpected exception) is requeued after a short backoff; when the
queue's delivery limit is reached the message goes to the DLQ with the last error as reason.
Nothing is ever dropped silently. A handler that returns a message answers an RPC request
(``reply_to``); one that raises a :class:`DomainError` for such a request answers it with
:class:`RequestRejected` (and is dead-lettered as above), so the caller hears why at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from prometheus_client import Counter, Histogram

from ..contracts.envelope import Envelope, Message, RequestRejected
from ..errors import DomainError, TransientError
from ..logging import bind_message_context
from .dedupe import Claim, Dedupe
from .publisher import AmqpPublisher
from .topology import DLX, QueueSpec, declare_queue

__all__ = ["REASON_HEADER", "Consumer", "Handler", "MessageContext"]

REASON_HEADER = "x-dockvm-reason"
log = structlog.get_logger("bus.consumer")

_HANDLED = Counter(
    "dockvm_messages_handled_total",
    "Messages handled by outcome",
    ["queue", "type", "outcome"],
)
_DURATION = Histogram("dockvm_message_handle_seconds", "Handler duration", ["queue", "type"])


@dataclass(slots=True)
class MessageContext:
    """What a handler knows about the message it handles, and how it answers in its name."""

    envelope: Envelope
    publisher: AmqpPublisher

    async def publish(
        self, msg: Message, *, routing_key: str | None = None, id: str | None = None
    ) -> Envelope:
        """Publish ``msg`` caused by this message (same correlation id)."""
        return await self.publisher.publish(
            msg,
            routing_key=routing_key,
            correlation_id=self.envelope.correlation_id,
            causation_id=self.envelope.id,
            id=id,
        )


Handler = Callable[[Any, MessageContext], Awaitable[Message | None]]


@dataclass
class Consumer:
    """Consumes one queue, dispatching by message type to ``handlers``."""

    channel: AbstractChannel
    spec: QueueSpec
    handlers: dict[str, Handler]
    publisher: AmqpPublisher
    dedupe: Dedupe | None = None
    retry_backoff_s: float = 0.2
    # How long a delivery waits for another worker's claim on the same id to end; longer
    # than the dedupe lease, so a crashed worker's claim is taken over instead of requeued.
    busy_wait_s: float = 70.0
    _queue: AbstractQueue | None = None
    _tag: str | None = None
    _inflight: set[asyncio.Task] = field(default_factory=set)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _ok_children: dict[str, Any] = field(default_factory=dict)
    _timer_children: dict[str, Any] = field(default_factory=dict)

    async def start(self) -> None:
        """Declare the topology and start consuming."""
        self._queue = await declare_queue(self.channel, self.spec)
        self._tag = await self._queue.consume(self._on_message)

    async def stop(self, grace_s: float = 20.0) -> None:
        """Stop taking new messages, then wait (up to ``grace_s``) for those in flight.

        A delivery only waiting out another worker's claim is handed back at once (requeued):
        it has done nothing yet, and waiting for it would hold the shutdown for the whole grace.
        """
        self._stopping.set()
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except Exception as err:  # the channel may already be gone
                log.warning("consumer cancel failed", queue=self.spec.name, error=repr(err))
            self._tag = None
        current = asyncio.current_task()
        pending = {t for t in self._inflight if t is not current}
        if pending:
            await asyncio.wait(pending, timeout=grace_s)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        queue = self.spec.name
        try:
            env = Envelope.from_bytes(message.body)
        except DomainError as err:
            await self._dead_letter(message, None, str(err))
            _HANDLED.labels(queue, message.type or "?", "invalid").inc()
            return
        bind_message_context(
            correlation_id=env.correlation_id, message_type=env.type, message_id=env.id
        )
        handler = self.handlers.get(env.type)
        if handler is None:
            await self._dead_letter(message, env, f"no handler for {env.type} on {queue}")
            _HANDLED.labels(queue, env.type, "unroutable").inc()
            return
        try:
            data = env.parse()
        except DomainError as err:
            await self._dead_letter(message, env, str(err))
            _HANDLED.labels(queue, env.type, "invalid").inc()
            return

        if self.dedupe is not None:
            claim = await self._claim(message, env)
            if claim is not Claim.NEW:
                return

        count = _delivery_count(message)
        ctx = MessageContext(env, self.publisher)
        started = time.perf_counter()
        try:
            reply = await handler(data, ctx)
        except DomainError as err:
            await self._forget(env)
            log.warning("message rejected", reason=err.reason, error=str(err))
            if message.reply_to:
                refusal = RequestRejected(reason=err.reason, status=err.status, detail=str(err))
                await self._reply(message, env, refusal)
            await self._dead_letter(message, env, f"{err.reason}: {err}")
            _HANDLED.labels(queue, env.type, "rejected").inc()
            return
        except asyncio.CancelledError:
            await self._forget(env)
            await message.nack(requeue=True)
            raise
        except Exception as err:
            await self._forget(env)
            await self._retry_or_give_up(message, env, err, count)
            return
        finally:
            self._timer(env.type).observe(time.perf_counter() - started)

        if reply is not None and message.reply_to:
            await self._reply(message, env, reply)
        if self.dedupe is not None:
            try:
                await self.dedupe.complete(env.id)
            except Exception as err:
                # The effect is durable; a redelivery is absorbed by the idempotent handler.
                log.warning("dedupe complete failed", error=repr(err))
        await message.ack()
        self._ok(env.type).inc()

    async def _claim(self, message: AbstractIncomingMessage, env: Envelope) -> Claim | None:
        """Claim the message id; settle the message unless it is ours to handle (NEW).

        A claim held by another worker (BUSY) is waited out here rather than requeued: a
        requeue counts against the delivery limit, so a message whose first worker crashed
        would reach the DLQ long before that worker's lease expired.
        """
        assert self.dedupe is not None
        queue = self.spec.name
        deadline = asyncio.get_running_loop().time() + self.busy_wait_s
        while True:
            try:
                claim = await self.dedupe.claim(env.id)
            except Exception as err:
                # The dedupe store is down: an exception here would leave the message unacked
                # for the life of the channel and, prefetch by prefetch, stall the consumer.
                log.warning("dedupe claim failed, requeued", error=repr(err))
                await asyncio.sleep(self.retry_backoff_s)
                await message.nack(requeue=True)
                _HANDLED.labels(queue, env.type, "requeued").inc()
                return None
            if claim is Claim.DONE:
                log.info("duplicate message skipped")
                await message.ack()
                _HANDLED.labels(queue, env.type, "duplicate").inc()
                return claim
            if claim is Claim.NEW:
                return claim
            if asyncio.get_running_loop().time() >= deadline or self._stopping.is_set():
                await message.nack(requeue=True)
                _HANDLED.labels(queue, env.type, "busy").inc()
                return claim
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), min(1.0, self.busy_wait_s))

    def _ok(self, type_: str) -> Any:
        # Metric children are looked up once per type: ``labels()`` costs more than ``inc()``.
        child = self._ok_children.get(type_)
        if child is None:
            child = self._ok_children[type_] = _HANDLED.labels(self.spec.name, type_, "ok")
        return child

    def _timer(self, type_: str) -> Any:
        child = self._timer_children.get(type_)
        if child is None:
            child = self._timer_children[type_] = _DURATION.labels(self.spec.name, type_)
        return child

    async def _forget(self, env: Envelope) -> None:
        if self.dedupe is not None:
            await self.dedupe.release(env.id)

    async def _retry_or_give_up(
        self, message: AbstractIncomingMessage, env: Envelope, err: Exception, count: int
    ) -> None:
        queue = self.spec.name
        transient = isinstance(err, TransientError)
        if count + 1 >= self.spec.delivery_limit:
            reason = f"delivery limit {self.spec.delivery_limit} reached; last error: {err!r}"
            log.error("message dead-lettered", reason=reason)
            await self._dead_letter(message, env, reason)
            _HANDLED.labels(queue, env.type, "exhausted").inc()
            return
        if transient:
            log.warning("transient failure, requeued", error=str(err), delivery=count + 1)
        else:
            log.exception("handler failed, requeued", delivery=count + 1)
        await asyncio.sleep(min(self.retry_backoff_s * (2**count), 5.0))
        await message.nack(requeue=True)
        _HANDLED.labels(queue, env.type, "requeued").inc()

    async def _dead_letter(
        self, message: AbstractIncomingMessage, env: Envelope | None, reason: str
    ) -> None:
        """Copy the message to this queue's DLQ with ``reason``, then ack the original."""
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:2000]
        headers["x-dockvm-queue"] = self.spec.name
        await self.publisher.publish_raw(
            message.body,
            routing_key=self.spec.name,
            exchange=DLX,
            headers=headers,
            message_id=message.message_id,
            type=message.type,
            correlation_id=message.correlation_id,
            content_type=message.content_type,
        )
        await message.ack()

    async def _reply(self, message: AbstractIncomingMessage, env: Envelope, reply: Message) -> None:
        out = Envelope.wrap(
            reply,
            source=self.publisher._source,
            correlation_id=env.correlation_id,
            causation_id=env.id,
        )
        await self.publisher.publish_raw(
            out.to_bytes(),
            routing_key=message.reply_to or "",
            exchange="",
            correlation_id=message.correlation_id,
            content_type="application/json",
            type=out.type,
            message_id=out.id,
        )


def _delivery_count(message: AbstractIncomingMessage) -> int:
    """How many times this message was delivered before (quorum queues count returns)."""
    raw = (message.headers or {}).get("x-delivery-count", 0)
    try:
        return int(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return 0
