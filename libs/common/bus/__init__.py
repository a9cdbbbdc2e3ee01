"""The dockvm bus on RabbitMQ: topology, publishing with confirms, the consumer wrapper, RPC."""

from .connection import BusUnavailable, connect
from .consumer import REASON_HEADER, Consumer, Handler, MessageContext
from .dedupe import Claim, Dedupe, MongoDedupe
from .fakes import MemoryDedupe, MemoryPublisher
from .publisher import AmqpPublisher, Publisher
from .rpc import RpcClient
from .topology import DLX, EXCHANGE, QueueSpec, declare_queue, dlq_name, host_key, queue_name

__all__ = [
    "DLX",
    "EXCHANGE",
    "REASON_HEADER",
    "AmqpPublisher",
    "BusUnavailable",
    "Claim",
    "Consumer",
    "Dedupe",
    "Handler",
    "MemoryDedupe",
    "MemoryPublisher",
    "MessageContext",
    "MongoDedupe",
    "Publisher",
    "QueueSpec",
    "RpcClient",
    "connect",
    "declare_queue",
    "dlq_name",
    "host_key",
    "queue_name",
]
