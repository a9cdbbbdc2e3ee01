"""Bus entrypoints of the monitor: the ``metrics.query`` RPC (thin: read, downsample, reply).

Delivery guarantee: requests arrive at least once on the shared ``monitor.queries`` queue; the
handler is a pure read, so a redelivery just answers again.
"""

from __future__ import annotations

from functools import partial

from libs.common.bus import Handler, MessageContext
from libs.common.contracts.monitor import MetricsQuery, MetricsQueryResult

from .domain import downsample
from .store import SampleStore

__all__ = ["metrics_query", "query_handlers"]


async def metrics_query(
    store: SampleStore, msg: MetricsQuery, ctx: MessageContext
) -> MetricsQueryResult:
    """Answer the history of one IP, downsampled to the asked step."""
    docs = await store.samples(str(msg.ip), msg.from_, msg.to)
    return MetricsQueryResult(
        ip=msg.ip, from_=msg.from_, to=msg.to, step=msg.step, points=downsample(docs, msg.step)
    )


def query_handlers(store: SampleStore) -> dict[str, Handler]:
    """The handlers of ``monitor.queries``, bound to the sample store."""
    return {MetricsQuery.TYPE: partial(metrics_query, store)}
