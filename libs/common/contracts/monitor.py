"""Messages of the monitor service: the lifecycle events and metric batches it emits, and the
``metrics.query`` request it answers.

Lifecycle events (``container.started|died|oom_killed|restarted|flapping|health``) are
published with a deterministic envelope id derived from the Docker event they come from, so a
consumer's dedupe drops the copy a monitor may send again after a reconnect or a restart.

``metrics.query`` and ``metrics.query_result`` are the contract of ``GET /v1/ips/{ip}/metrics``
(its query and its JSON). History lives in Prometheus, which scrapes each monitor's
``/metrics``; the gateway reads it there, so no monitor consumes ``monitor.queries`` any more
(the name stays for older gateways, whose requests now time out with a 503).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from ipaddress import IPv4Address
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from .envelope import Command, Event, register

__all__ = [
    "MAX_QUERY_POINTS",
    "QUERIES_QUEUE",
    "STEPS",
    "ContainerDied",
    "ContainerFlapping",
    "ContainerHealth",
    "ContainerOomKilled",
    "ContainerRestarted",
    "ContainerSample",
    "ContainerStarted",
    "IpOwner",
    "MetricPoint",
    "MetricsBatch",
    "MetricsQuery",
    "MetricsQueryResult",
]

QUERIES_QUEUE = "monitor.queries"
"""The queue all monitors share for ``metrics.query`` (one answers each request)."""

STEPS: dict[str, int] = {"raw": 0, "10s": 10, "1m": 60, "10m": 600, "1h": 3600}
"""Downsampling steps a query may ask for, in seconds (``raw``: the samples as taken, every
scrape; ``10s``/``1h``: Prometheus-style spellings beside the words of the first API)."""

MAX_QUERY_POINTS = 20_000
"""A query whose range would give more points than this at its step is refused."""

MachineId = str


class _ContainerEvent(Event):
    machine_id: MachineId
    container_id: str
    host: str
    ip: IPv4Address | None = None
    app: str | None = None
    at: datetime
    synthesized: bool = Field(
        default=False,
        description="true when reconstructed by a resync after the events stream was cut",
    )


@register
class ContainerStarted(_ContainerEvent):
    """The container of ``machine_id`` started (first start, manual start or a restart)."""

    TYPE = "container.started"


@register
class ContainerDied(_ContainerEvent):
    """The container's init exited; ``oom_killed`` when the kernel's OOM killer did it."""

    TYPE = "container.died"
    exit_code: int | None = None
    oom_killed: bool = False


@register
class ContainerOomKilled(_ContainerEvent):
    """The OOM killer killed a process of the container (it may or may not have died)."""

    TYPE = "container.oom_killed"


@register
class ContainerRestarted(_ContainerEvent):
    """The container started again after dying (restart policy) or by ``docker restart``."""

    TYPE = "container.restarted"
    restarts_in_window: int = 1


@register
class ContainerFlapping(_ContainerEvent):
    """At least ``threshold`` restarts within ``window_s``: a restart loop."""

    TYPE = "container.flapping"
    restarts: int
    window_s: int
    threshold: int


@register
class ContainerHealth(_ContainerEvent):
    """The container's Docker health check changed to ``status``."""

    TYPE = "container.health"
    status: str


class ContainerSample(Event):
    """One container's figures over one sampling interval (rates and gauges, plus counters)."""

    TYPE = "metrics.sample"
    machine_id: MachineId
    container_id: str
    ip: IPv4Address | None = None
    app: str | None = None
    at: datetime
    interval_s: float
    cpu_percent: float | None = Field(
        default=None, description="usage as % of the container's own quota (None: first sample)"
    )
    cpu_cores: float | None = Field(
        default=None, description="CPUs used over the interval (0.5 = half of one core)"
    )
    cpu_quota_cpus: float
    cpu_usage_s: float
    cpu_throttled_periods: int
    cpu_throttled_s: float
    mem_usage: int
    mem_working_set: int
    mem_rss: int
    mem_cache: int
    mem_limit: int
    oom_kills: int
    net_rx_bytes: int
    net_tx_bytes: int
    net_rx_packets: int
    net_tx_packets: int
    blk_read_bytes: int
    blk_write_bytes: int
    blk_read_ops: int
    blk_write_ops: int
    pids: int


@register
class MetricsBatch(Event):
    """Every interval, per host: the samples of every dockvm container on it."""

    TYPE = "metrics.batch"
    host: str
    at: datetime
    interval_s: float
    samples: list[ContainerSample]


@register
class MetricsQuery(Command):
    """History of one IP between ``from`` and ``to``, downsampled to ``step``."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, serialize_by_alias=True
    )
    TYPE = "metrics.query"
    ip: IPv4Address
    from_: datetime = Field(alias="from")
    to: datetime
    step: Literal["raw", "10s", "1m", "10m", "1h"] = "1m"

    @model_validator(mode="after")
    def _range(self) -> MetricsQuery:
        if self.from_.tzinfo is None or self.to.tzinfo is None:
            raise ValueError("from and to need a timezone (e.g. 2026-11-27T10:00:00Z)")
        if self.to <= self.from_:
            raise ValueError("to must be after from")
        step = STEPS[self.step] or 10
        if (self.to - self.from_) / timedelta(seconds=step) > MAX_QUERY_POINTS:
            raise ValueError(
                f"the range gives more than {MAX_QUERY_POINTS} points at step {self.step}: "
                "use a coarser step or a shorter range"
            )
        return self


class MetricPoint(Event):
    """One bucket of an IP's history: gauges averaged (and peaked), counters summed."""

    TYPE = "metrics.point"
    t: datetime
    samples: int
    machine_id: MachineId | None = None
    cpu_percent: float | None = None
    cpu_percent_max: float | None = None
    cpu_throttled_s: float = 0.0
    mem_usage: float | None = None
    mem_working_set: float | None = None
    mem_working_set_max: int | None = None
    mem_limit: int | None = None
    oom_kills: int = 0
    net_rx_bytes: int = 0
    net_tx_bytes: int = 0
    net_rx_packets: int = 0
    net_tx_packets: int = 0
    blk_read_bytes: int = 0
    blk_write_bytes: int = 0
    pids: float | None = None


class IpOwner(Event):
    """A machine that held the IP during a query's window (ipam's history), and when."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", populate_by_name=True, serialize_by_alias=True
    )
    TYPE = "metrics.ip_owner"
    machine_id: MachineId
    from_: datetime | None = Field(default=None, alias="from")
    until: datetime | None = None


@register
class MetricsQueryResult(Event):
    """The answer to ``metrics.query``: points in time order (empty if the IP has no history)."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", populate_by_name=True, serialize_by_alias=True
    )
    TYPE = "metrics.query_result"
    ip: IPv4Address
    from_: datetime = Field(alias="from")
    to: datetime
    step: str
    points: list[MetricPoint]
    # Added with the Prometheus history: who held the IP in the window; points carry the
    # machine_id of the owner they were measured on, split at each change of owner.
    owners: list[IpOwner] = Field(default_factory=list)
