"""Prometheus exposition of the latest sample of each container, labelled ip/machine_id/app/host,
and of the lifecycle facts the alert rules need (restarts, OOM kills).

A custom collector: it renders whatever the last round produced at scrape time, so containers
that are gone disappear from ``/metrics`` instead of lingering as stale label sets. The
lifecycle counters outlive their container's samples for an hour: an OOM kill that takes the
container down must still be scraped once. Each starts at 0 the first time its container is
sampled, so Prometheus sees it go up (a series born at 1 shows no increase).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from libs.common.contracts.envelope import Message
from libs.common.contracts.monitor import (
    ContainerDied,
    ContainerOomKilled,
    ContainerRestarted,
    ContainerSample,
)

__all__ = ["ContainerCollector"]

_LABELS = ["ip", "machine_id", "app", "host"]
# (metric name, help, sample field, counter?)
_SERIES: tuple[tuple[str, str, str, bool], ...] = (
    (
        "dockvm_container_cpu_percent",
        "CPU used over the last interval, % of the quota",
        "cpu_percent",
        False,
    ),
    ("dockvm_container_cpu_cores", "CPUs used over the last interval", "cpu_cores", False),
    ("dockvm_container_cpu_quota_cpus", "CPU quota in CPUs", "cpu_quota_cpus", False),
    ("dockvm_container_cpu_usage_seconds", "CPU time used", "cpu_usage_s", True),
    (
        "dockvm_container_cpu_throttled_periods",
        "CFS periods throttled",
        "cpu_throttled_periods",
        True,
    ),
    ("dockvm_container_cpu_throttled_seconds", "Time throttled", "cpu_throttled_s", True),
    ("dockvm_container_memory_usage_bytes", "Memory usage", "mem_usage", False),
    (
        "dockvm_container_memory_working_set_bytes",
        "Usage minus inactive file",
        "mem_working_set",
        False,
    ),
    ("dockvm_container_memory_rss_bytes", "Anonymous memory", "mem_rss", False),
    ("dockvm_container_memory_cache_bytes", "Page cache", "mem_cache", False),
    ("dockvm_container_memory_limit_bytes", "Memory limit", "mem_limit", False),
    ("dockvm_container_oom_kills", "OOM kills", "oom_kills", True),
    ("dockvm_container_network_receive_bytes", "Bytes received", "net_rx_bytes", True),
    ("dockvm_container_network_transmit_bytes", "Bytes sent", "net_tx_bytes", True),
    ("dockvm_container_network_receive_packets", "Packets received", "net_rx_packets", True),
    ("dockvm_container_network_transmit_packets", "Packets sent", "net_tx_packets", True),
    ("dockvm_container_blkio_read_bytes", "Bytes read from block devices", "blk_read_bytes", True),
    (
        "dockvm_container_blkio_write_bytes",
        "Bytes written to block devices",
        "blk_write_bytes",
        True,
    ),
    ("dockvm_container_blkio_read_ops", "Block read operations", "blk_read_ops", True),
    ("dockvm_container_blkio_write_ops", "Block write operations", "blk_write_ops", True),
    ("dockvm_container_pids", "Tasks in the container", "pids", False),
)


_LIFECYCLE = (
    (
        "dockvm_container_restarts",
        "Restarts seen by this monitor (restart policy or docker restart)",
    ),
    ("dockvm_container_oom_events", "OOM kills seen by this monitor"),
)
_KEEP_S = 3600.0  # how long a gone container's lifecycle counters stay exposed


class ContainerCollector(Collector):
    """Holds the last round's samples and the lifecycle counters; renders them on scrape."""

    def __init__(self, host: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._host = host
        self._samples: list[ContainerSample] = []
        self._clock = clock
        # labels -> [restarts, oom events, last seen]
        self._counts: dict[tuple[str, ...], list[float]] = {}

    def update(self, samples: Iterable[ContainerSample]) -> None:
        """Replace the samples shown (one list swap: scrapes see a whole round)."""
        self._samples = list(samples)
        now = self._clock()
        for s in self._samples:
            self._counts.setdefault(self._labels(s), [0, 0, now])[2] = now
        for key in [k for k, v in self._counts.items() if now - v[2] > _KEEP_S]:
            del self._counts[key]

    def _labels(self, s: ContainerSample | Message) -> tuple[str, ...]:
        ip = getattr(s, "ip", None)
        return (
            str(ip) if ip else "",
            getattr(s, "machine_id", ""),
            getattr(s, "app", None) or "",
            self._host,
        )

    def note(self, msg: Message) -> None:
        """Count a lifecycle event: a restart, or an OOM kill (one per kill: the die that
        follows an ``oom`` event is not counted again, a die found by a resync is)."""
        if isinstance(msg, ContainerRestarted):
            slot = 0
        elif isinstance(msg, ContainerOomKilled) or (
            isinstance(msg, ContainerDied) and msg.oom_killed and msg.synthesized
        ):
            slot = 1
        else:
            return
        row = self._counts.setdefault(self._labels(msg), [0, 0, self._clock()])
        row[slot] += 1
        row[2] = self._clock()

    def collect(self) -> Iterator[Metric]:
        """Yield one family per series."""
        samples = self._samples
        for name, doc, attr, counter in _SERIES:
            family: GaugeMetricFamily | CounterMetricFamily = (
                CounterMetricFamily(name, doc, labels=_LABELS)
                if counter
                else GaugeMetricFamily(name, doc, labels=_LABELS)
            )
            for s in samples:
                value = getattr(s, attr)
                if value is None:
                    continue
                labels = [str(s.ip) if s.ip else "", s.machine_id, s.app or "", self._host]
                family.add_metric(labels, float(value))
            yield family
        counts = list(self._counts.items())
        for slot, (name, doc) in enumerate(_LIFECYCLE):
            counter = CounterMetricFamily(name, doc, labels=_LABELS)
            for labels, row in counts:
                counter.add_metric(list(labels), row[slot])
            yield counter

    def describe(self) -> Iterator[Metric]:
        """No fixed description: the families are built at scrape time."""
        return iter(())
