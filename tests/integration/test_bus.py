"""The consumer wrapper against the real RabbitMQ (and the dedupe store on the real MongoDB API)."""

from __future__ import annotations

import asyncio
from collections import Counter

import aio_pika
import pytest

from libs.common.bus import (
    REASON_HEADER,
    AmqpPublisher,
    Consumer,
    MessageContext,
    MongoDedupe,
    QueueSpec,
    connect,
    dlq_name,
)
from libs.common.contracts import Command, Envelope, register
from libs.common.errors import DomainError, NotFoundError, TransientError
from tests.support.proxy import TcpProxy
from tests.support.stack import AMQP_HOST, AMQP_PORT


@register
class _Work(Command):
    TYPE = "test.work"
    n: int


async def _consumer(amqp, publisher, handler, *, limit=3, dedupe=None, name="svc"):
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=8)
    consumer = Consumer(
        channel,
        QueueSpec(name, ("test.#",), delivery_limit=limit),
        {"test.work": handler},
        publisher,
        dedupe=dedupe,
        retry_backoff_s=0.01,
    )
    await consumer.start()
    return consumer


async def _drain(amqp, queue: str, expect: int, timeout: float = 20.0) -> list:
    channel = await amqp.channel()
    q = await channel.get_queue(queue, ensure=True)
    got = []
    async with asyncio.timeout(timeout):
        while len(got) < expect:
            msg = await q.get(fail=False)
            if msg is None:
                await asyncio.sleep(0.05)
                continue
            await msg.ack()
            got.append(msg)
    return got


async def test_poison_message_reaches_dlq_with_reason_while_good_ones_flow(amqp, publisher):
    handled: list[int] = []

    async def handler(msg: _Work, ctx: MessageContext) -> None:
        if msg.n == 13:
            raise TransientError("downstream keeps failing")
        handled.append(msg.n)

    consumer = await _consumer(amqp, publisher, handler, limit=3)
    for n in range(30):
        await publisher.publish(_Work(n=n))
    dead = await _drain(amqp, dlq_name("svc"), 1)
    await asyncio.sleep(0.3)
    await consumer.stop()

    assert sorted(handled) == [n for n in range(30) if n != 13]
    assert "delivery limit 3 reached" in dead[0].headers[REASON_HEADER]
    assert "downstream keeps failing" in dead[0].headers[REASON_HEADER]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "invalid envelope"),
        (b'{"type":"test.work","source":"t","data":{"n":"x"}}', "invalid test.work v1"),
        (b'{"type":"test.work","source":"t","data":{"n":1,"extra":2}}', "extra"),
        (b'{"type":"test.nobody","source":"t","data":{}}', "no handler for test.nobody"),
    ],
)
async def test_invalid_message_is_dead_lettered_at_once(amqp, publisher, body, reason):
    calls = Counter()

    async def handler(msg: _Work, ctx: MessageContext) -> None:
        calls["n"] += 1

    consumer = await _consumer(amqp, publisher, handler)
    await publisher.publish_raw(body, routing_key="test.work")
    dead = await _drain(amqp, dlq_name("svc"), 1)
    await consumer.stop()

    assert reason in dead[0].headers[REASON_HEADER]
    assert calls["n"] == 0


async def test_domain_error_is_rejected_without_retry(amqp, publisher):
    calls = Counter()

    async def handler(msg: _Work, ctx: MessageContext) -> None:
        calls["n"] += 1
        raise DomainError("pool is full", reason="pool_exhausted")

    consumer = await _consumer(amqp, publisher, handler, limit=5)
    await publisher.publish(_Work(n=1))
    dead = await _drain(amqp, dlq_name("svc"), 1)
    await consumer.stop()

    assert calls["n"] == 1
    assert dead[0].headers[REASON_HEADER] == "pool_exhausted: pool is full"


async def test_duplicate_message_id_has_exactly_one_effect(amqp, publisher, mongo_db):
    coll = mongo_db["effects"]

    async def handler(msg: _Work, ctx: MessageContext) -> None:
        await coll.update_one({"_id": "counter"}, {"$inc": {"n": 1}}, upsert=True)

    dedupe = MongoDedupe(mongo_db["bus_processed"], "svc")
    consumer = await _consumer(amqp, publisher, handler, dedupe=dedupe)
    for _ in range(5):
        await publisher.publish(_Work(n=7), id="same-id")
    await publisher.publish(_Work(n=8), id="other-id")
    async with asyncio.timeout(20):
        while await mongo_db["bus_processed"].count_documents({"state": "done"}) < 2:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    await consumer.stop()

    assert (await coll.find_one({"_id": "counter"}))["n"] == 2
    assert (await amqp_queue_depth(amqp, "svc")) == 0


async def test_transient_failure_is_retried_then_succeeds(amqp, publisher):
    attempts = Counter()
    done = asyncio.Event()

    async def handler(msg: _Work, ctx: MessageContext) -> None:
        attempts[msg.n] += 1
        if attempts[msg.n] < 3:
            raise TransientError("not yet")
        done.set()

    consumer = await _consumer(amqp, publisher, handler, limit=5)
    await publisher.publish(_Work(n=1))
    await asyncio.wait_for(done.wait(), 20)
    await asyncio.sleep(0.2)
    await consumer.stop()

    assert attempts[1] == 3
    assert (await amqp_queue_depth(amqp, dlq_name("svc"))) == 0


async def test_rpc_reply(amqp, publisher):
    from libs.common.bus import RpcClient

    async def handler(msg: _Work, ctx: MessageContext) -> _Work:
        return _Work(n=msg.n * 2)

    consumer = await _consumer(amqp, publisher, handler)
    rpc = RpcClient(amqp, source="tests")
    reply = await rpc.request(_Work(n=21), timeout=10)
    await rpc.close()
    await consumer.stop()

    assert reply == _Work(n=42)


async def test_a_refused_request_is_answered_at_once_with_the_handlers_error(amqp, publisher):
    from libs.common.bus import RpcClient

    async def handler(msg: _Work, ctx: MessageContext) -> _Work:
        if msg.n == 404:
            raise NotFoundError("no pool dc9/7")
        raise DomainError("pool is full", reason="pool_exhausted")

    consumer = await _consumer(amqp, publisher, handler)
    rpc = RpcClient(amqp, source="tests")
    started = asyncio.get_running_loop().time()
    with pytest.raises(NotFoundError) as missing:
        await rpc.request(_Work(n=404), timeout=30)
    with pytest.raises(DomainError) as full:
        await rpc.request(_Work(n=1), timeout=30)
    took = asyncio.get_running_loop().time() - started
    dead = await _drain(amqp, dlq_name("svc"), 2)
    await rpc.close()
    await consumer.stop()

    assert took < 10  # answered, not waited out (the timeout is 30 s)
    assert (str(missing.value), missing.value.reason, missing.value.status) == (
        "no pool dc9/7", "not_found", 404)  # fmt: skip
    assert (str(full.value), full.value.reason, full.value.status) == (
        "pool is full", "pool_exhausted", 400)  # fmt: skip
    assert sorted(m.headers[REASON_HEADER] for m in dead) == [
        "not_found: no pool dc9/7", "pool_exhausted: pool is full"]  # fmt: skip


@pytest.fixture
async def proxy():
    """A TCP proxy in front of RabbitMQ."""
    p = await TcpProxy(AMQP_HOST, AMQP_PORT).start()
    yield p
    await p.close()


@pytest.mark.parametrize("cut_by", ["broker", "network"])
async def test_rpc_reply_after_the_connection_is_cut_and_restored(
    amqp, publisher, vhost, proxy, cut_by
):
    """The broker closing the connection, or the network dropping it while the broker still
    holds the old one (what an exclusive reply queue does not survive), then a reconnect."""
    from libs.common.bus import RpcClient

    async def handler(msg: _Work, ctx: MessageContext) -> _Work:
        return _Work(n=msg.n * 2)

    consumer = await _consumer(amqp, publisher, handler)
    rpc_connection = await connect(vhost.url_via("127.0.0.1", proxy.port), name="tests-rpc")
    rpc = RpcClient(rpc_connection, source="tests")
    before = await rpc.request(_Work(n=1), timeout=10)
    reconnected = asyncio.Event()
    rpc_connection.reconnect_callbacks.add(lambda *_: reconnected.set())
    await (vhost.close_connections() if cut_by == "broker" else proxy.cut())
    # aio-pika retries every 5 s; one CI run on a loaded host took over 30 s to get back.
    await asyncio.wait_for(reconnected.wait(), 90)
    after = await rpc.request(_Work(n=21), timeout=10)
    await rpc.close()
    await rpc_connection.close()
    await consumer.stop()

    assert before == _Work(n=2)
    assert after == _Work(n=42)


async def test_while_the_broker_is_unreachable_a_request_fails_as_transient(amqp, vhost, proxy):
    """aio-pika raises a plain RuntimeError for a channel of a connection that is down; the bus
    says TransientError, so that the gateway answers 503 (retry) rather than 500."""
    from libs.common.bus import RpcClient

    connection = await connect(vhost.url_via("127.0.0.1", proxy.port), name="tests-down")
    rpc = RpcClient(connection, source="tests")
    down = AmqpPublisher(connection, source="tests")
    await proxy.close()  # no listener: the robust connection cannot come back
    async with asyncio.timeout(30):
        while not connection.is_closed and connection.transport is not None:
            await asyncio.sleep(0.05)

    with pytest.raises(TransientError):
        await rpc.request(_Work(n=1), timeout=5)
    with pytest.raises(TransientError):
        await down._publish_once(Envelope.wrap(_Work(n=1), source="tests"), "x", None, False)
    await connection.close()


async def amqp_queue_depth(amqp, name: str) -> int:
    channel = await amqp.channel()
    q = await channel.declare_queue(name, passive=True)
    depth = q.declaration_result.message_count
    await channel.close()
    return depth


async def test_publisher_sends_persistent_messages(amqp, publisher: AmqpPublisher):
    channel = await amqp.channel()
    exchange = await channel.declare_exchange("dockvm", aio_pika.ExchangeType.TOPIC, durable=True)
    q = await channel.declare_queue("", exclusive=True)
    await q.bind(exchange, "test.work")
    env = await publisher.publish(_Work(n=5), correlation_id="corr-1")
    msg = await q.get(timeout=5)

    assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert msg.message_id == env.id
    assert msg.correlation_id == "corr-1"


async def test_claim_of_a_crashed_worker_is_waited_out_not_dead_lettered(amqp, publisher, mongo_db):
    done = asyncio.Event()

    async def handler(msg: _Work, ctx: MessageContext) -> None:
        done.set()

    coll = mongo_db["bus_processed"]
    # What a worker killed mid-handler leaves behind: a fresh claim that nobody will finish.
    from datetime import UTC, datetime

    await coll.insert_one({"_id": "svc:crashed-id", "state": "processing", "at": datetime.now(UTC)})
    consumer = await _consumer(
        amqp, publisher, handler, limit=3, dedupe=MongoDedupe(coll, "svc", lease_s=2)
    )
    await publisher.publish(_Work(n=1), id="crashed-id")
    await asyncio.wait_for(done.wait(), 20)
    async with asyncio.timeout(10):  # handled for good: its mark is written after the handler
        while await coll.find_one({"_id": "svc:crashed-id#done"}) is None:
            await asyncio.sleep(0.05)
    await consumer.stop()

    assert (await coll.find_one({"_id": "svc:crashed-id"}))["state"] == "processing"
    assert (await amqp_queue_depth(amqp, dlq_name("svc"))) == 0


async def test_stopping_hands_back_a_delivery_waiting_on_another_claim_at_once(
    amqp, publisher, mongo_db
):
    from datetime import UTC, datetime

    async def handler(msg: _Work, ctx: MessageContext) -> None:
        raise AssertionError("a claimed message must not run here")

    coll = mongo_db["bus_processed"]
    await coll.insert_one({"_id": "svc:held-id", "state": "processing", "at": datetime.now(UTC)})
    consumer = await _consumer(
        amqp, publisher, handler, dedupe=MongoDedupe(coll, "svc", lease_s=600)
    )
    await publisher.publish(_Work(n=1), id="held-id")
    while not consumer._inflight:  # the delivery arrived and waits on the claim
        await asyncio.sleep(0.05)
    started = asyncio.get_running_loop().time()

    await consumer.stop(grace_s=60)

    assert asyncio.get_running_loop().time() - started < 30  # not the 60 s grace
    assert [m.message_id for m in await _drain(amqp, "svc", 1)] == ["held-id"]  # requeued


async def test_a_request_nobody_serves_fails_at_once_and_says_so(amqp, vhost):
    from libs.common.bus import RpcClient
    from libs.common.bus.topology import declare_exchanges

    channel = await amqp.channel()
    await declare_exchanges(channel)
    await channel.close()
    rpc = RpcClient(amqp, source="tests")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TransientError, match="no service takes test.work requests"):
        await rpc.request(_Work(n=1), routing_key="nobody.serves.this", timeout=20)
    waited = loop.time() - started
    await rpc.close()

    assert waited < 10  # returned by the broker, not the 20 s timeout
