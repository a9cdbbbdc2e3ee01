"""Publish→consume throughput through the real RabbitMQ: the libs/common bus vs bare aio-pika.

Both sides publish persistent messages with publisher confirms (a window of outstanding
confirms) into a quorum queue and consume with manual acks, in the same run, on a fresh vhost.
The dockvm side goes through ``AmqpPublisher`` and the ``Consumer`` wrapper (envelope parsing,
pydantic validation, metrics, ack after the handler); it is measured without and with the
MongoDB-backed message-id dedupe. ``bare-wire`` is the bare loop sending what dockvm puts on
the wire (envelope bytes, AMQP properties, queue arguments), which splits the gap into the
broker's share and our Python's. Prints messages/s and this process's CPU per message (medians
of the rounds) and the ratios to bare.

    .venv/bin/python -m bench.bus [--messages 5000] [--rounds 3] [--only SIDE]

``--only`` runs one side alone (same message count), so that a sampling profiler sees one loop:
``py-spy record --format raw -o /tmp/bare.txt -- .venv/bin/python -m bench.bus --only bare``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass

import aio_pika

from bench._common import machine, median
from libs.common.bus import (
    AmqpPublisher,
    Consumer,
    MessageContext,
    MongoDedupe,
    QueueSpec,
    connect,
    dlq_name,
)
from libs.common.bus.publisher import amqp_message
from libs.common.contracts import Command, Envelope, register
from libs.common.db import mongo_client
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost

WINDOW = 200


@dataclass(frozen=True, slots=True)
class Run:
    """One round of one side: messages per second, and this process's CPU per message."""

    rate: float
    cpu_us: float

    @classmethod
    def measure(cls, total: int, wall: float, cpu: float) -> Run:
        """Build from elapsed wall-clock and process CPU seconds for ``total`` messages."""
        return cls(total / wall, cpu / total * 1e6)


@register
class BenchPing(Command):
    """The benchmark's message."""

    TYPE = "bench.ping"
    n: int
    payload: str


async def _windowed(coros_factory, total: int) -> None:
    sem = asyncio.Semaphore(WINDOW)

    async def one(i: int) -> None:
        async with sem:
            await coros_factory(i)

    await asyncio.gather(*(one(i) for i in range(total)))


async def bare(url: str, total: int, wire: bool = False) -> Run:
    """Bare aio-pika: confirms + persistent publish, manual-ack consume, quorum queue.

    With ``wire``, every message is what the dockvm side puts on the wire (an envelope's bytes,
    its AMQP properties, our queue arguments), built once: the rest of the gap is our Python.
    """
    conn = await aio_pika.connect_robust(url)
    pub_ch = await conn.channel(publisher_confirms=True)
    con_ch = await conn.channel()
    await con_ch.set_qos(prefetch_count=32)
    ex = await pub_ch.declare_exchange("bare", aio_pika.ExchangeType.TOPIC, durable=True)
    name = f"bare-{uuid.uuid4().hex[:6]}"
    arguments = QueueSpec(name, ()).arguments() if wire else {"x-queue-type": "quorum"}
    q = await con_ch.declare_queue(name, durable=True, arguments=arguments)
    await q.bind("bare", "bench.#")
    done = asyncio.Event()
    seen = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen
        await message.ack()
        seen += 1
        if seen == total:
            done.set()

    await q.consume(on_message)
    body = b'{"n": 0, "payload": "' + b"x" * 200 + b'"}'
    props: dict[str, object] = {}
    if wire:
        sample = amqp_message(Envelope.wrap(BenchPing(n=0, payload="x" * 200), source="bench"))
        body = sample.body
        props = {k: getattr(sample, k) for k in ("content_type", "message_id", "type")}
        props["correlation_id"] = sample.correlation_id
    started, cpu_started = time.perf_counter(), time.process_time()
    await _windowed(
        lambda i: ex.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props),
            routing_key="bench.ping",
        ),
        total,
    )
    await done.wait()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    await q.delete(if_unused=False, if_empty=False)
    await conn.close()
    return Run.measure(total, elapsed, cpu)


async def dockvm(url: str, total: int, with_dedupe: bool) -> Run:
    """The same through AmqpPublisher and the Consumer wrapper."""
    conn = await connect(url, name="bench")
    publisher = AmqpPublisher(conn, source="bench")
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=32)
    done = asyncio.Event()
    seen = 0

    async def handler(msg: BenchPing, ctx: MessageContext) -> None:
        nonlocal seen
        seen += 1
        if seen == total:
            done.set()

    # No MongoDB client unless the dedupe needs one: its background monitoring would run in
    # this process's CPU time, which the bare side does not pay.
    mongo = mongo_client(MONGO_URL, "bench") if with_dedupe else None
    db_name = f"bench_{uuid.uuid4().hex[:8]}"
    name = f"svc-{uuid.uuid4().hex[:6]}"
    dedupe = MongoDedupe(mongo[db_name]["bus_processed"], name) if mongo is not None else None
    consumer = Consumer(
        channel, QueueSpec(name, ("bench.#",)), {"bench.ping": handler}, publisher, dedupe=dedupe
    )
    await consumer.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    await _windowed(lambda i: publisher.publish(BenchPing(n=i, payload="x" * 200)), total)
    await done.wait()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    await consumer.stop()
    # The queue is bound to ``bench.#`` on the shared ``dockvm`` exchange: left behind, it would
    # take a copy of every message of the later rounds, and the broker would write each message
    # into one more quorum queue per round (this skewed the figures before 2026-11-29).
    for queue in (name, dlq_name(name)):
        await channel.queue_delete(queue)
    await publisher.close()
    await conn.close()
    if mongo is not None:
        await mongo.drop_database(db_name)
        await mongo.close()
    return Run.measure(total, elapsed, cpu)


SIDES = {
    "bare": bare,
    "bare-wire": lambda url, total: bare(url, total, wire=True),
    "dockvm": lambda url, total: dockvm(url, total, False),
    # The dedupe costs two FerretDB writes per message: a fifth of the messages keeps it short.
    "dockvm+dedupe": lambda url, total: dockvm(url, max(1, total // 5), True),
}


async def main() -> None:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=list(SIDES), help="run one side alone (for profiling)")
    args = parser.parse_args()
    sides = [args.only] if args.only else list(SIDES)
    vhost = await create_vhost()
    try:
        results: dict[str, list[Run]] = {side: [] for side in sides}
        for _ in range(args.rounds):
            for side in sides:
                results[side].append(await SIDES[side](vhost.url, args.messages))
    finally:
        await delete_vhost(vhost)
    _report(args, results)


def _report(args: argparse.Namespace, results: dict[str, list[Run]]) -> None:
    print(f"# bench/bus.py  {machine()}  messages={args.messages} rounds={args.rounds}")
    header = ("msg/s (median)", 16), ("ratio to bare", 16), ("CPU µs/msg", 12), ("CPU ratio", 11)
    print(f"{'path':<16}" + "".join(f"{title:>{width}}" for title, width in header))
    bare_runs = results.get("bare")
    for name, runs in results.items():
        rate, cpu = median([r.rate for r in runs]), median([r.cpu_us for r in runs])
        if bare_runs:
            # Ratios of medians over the same rounds; the CPU ratio is bare's over ours, so
            # that above 1 is better, like the throughput ratio.
            ratio = f"{rate / median([r.rate for r in bare_runs]):>16.2f}"
            cpu_ratio = f"{median([r.cpu_us for r in bare_runs]) / cpu:>11.2f}"
        else:
            ratio, cpu_ratio = f"{'-':>16}", f"{'-':>11}"
        print(f"{name:<16}{rate:>16.0f}{ratio}{cpu:>12.0f}{cpu_ratio}")
        print(f"{'':<16}rounds: " + ", ".join(f"{r.rate:.0f}" for r in runs))


if __name__ == "__main__":
    asyncio.run(main())
