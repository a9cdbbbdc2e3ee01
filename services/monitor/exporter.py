"""Prometheus exposition of the latest sample of each container, labelled ip/machine_id/app/host.

A custom collector: it renders whatever the last round produced at scrape time, so containers
that are gone disappear from ``/metrics`` instead of lingering as stale label sets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from libs.common.contracts.monitor import ContainerSample

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


class ContainerCollector(Collector):
    """Holds the last round's samples and renders them on scrape."""

    def __init__(self, host: str) -> None:
        self._host = host
        self._samples: list[ContainerSample] = []

    def update(self, samples: Iterable[ContainerSample]) -> None:
        """Replace the samples shown (one list swap: scrapes see a whole round)."""
        self._samples = list(samples)

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

    def describe(self) -> Iterator[Metric]:
        """No fixed description: the families are built at scrape time."""
        return iter(())
