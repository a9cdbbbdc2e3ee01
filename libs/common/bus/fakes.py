"""In-memory fakes of the bus ports (:class:`Publisher`, :class:`Dedupe`) for unit tests.

Nothing is delivered: the publisher records what it was given, the dedupe keeps its claims in a
dict. tests/integration/test_db_and_dedupe.py runs the dedupe's contract against this fake and
:class:`~libs.common.bus.dedupe.MongoDedupe` alike.
"""

from __future__ import annotations

from ..contracts.envelope import Envelope, Message
from .dedupe import Claim

__all__ = ["MemoryDedupe", "MemoryPublisher"]


class MemoryPublisher:
    """In-memory :class:`~libs.common.bus.publisher.Publisher` for unit tests of handler logic."""

    def __init__(self, source: str = "test") -> None:
        self.source = source
        self.sent: list[tuple[str, Envelope]] = []

    async def publish(
        self,
        msg: Message,
        *,
        routing_key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        id: str | None = None,
    ) -> Envelope:
        """Record the message instead of sending it."""
        env = Envelope.wrap(
            msg, source=self.source, correlation_id=correlation_id, causation_id=causation_id, id=id
        )
        self.sent.append((routing_key or env.type, env))
        return env

    def of_type(self, type_: str) -> list[Message]:
        """The parsed messages of one type, in order."""
        return [env.parse() for _, env in self.sent if env.type == type_]


class MemoryDedupe:
    """In-memory :class:`~libs.common.bus.dedupe.Dedupe` for unit tests."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}

    async def claim(self, message_id: str) -> Claim:
        """Take the id unless it is held or done."""
        state = self.states.get(message_id)
        if state == "done":
            return Claim.DONE
        if state == "processing":
            return Claim.BUSY
        self.states[message_id] = "processing"
        return Claim.NEW

    async def complete(self, message_id: str) -> None:
        """Mark done."""
        self.states[message_id] = "done"

    async def release(self, message_id: str) -> None:
        """Forget a claim in progress."""
        if self.states.get(message_id) == "processing":
            del self.states[message_id]
