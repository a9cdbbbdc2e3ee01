"""Pure logic of an IP's metrics history read from Prometheus: the one PromQL expression a
query sends, the points built from its answer, and the split by owner from ipam's history.

A query is a few ``query_range`` whatever its fields: each field's expression is tagged with a
label ``f`` (``label_replace``) and the expressions are joined with ``or`` into four queries sent
at once, so Prometheus answers every field of every machine that held the IP in one round trip
of four concurrent requests. A point is a bucket
``[t, t + step)``: Prometheus evaluates at the bucket's end over the window ``(t, t + step]``.
Counters are ``increase()`` over the bucket when it holds several scrapes (1 m and coarser), and
the difference between the last samples at both ends (``x - x offset step``, never negative)
when it holds one (``raw``, ``10s``). Measured on a week of one IP: ``increase()`` halves the
cost of a 10 m query against the two lookups per step (bench/monitor_history.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from libs.common.contracts.monitor import STEPS, IpOwner, MetricPoint

__all__ = [
    "SCRAPE_S",
    "OwnerWindow",
    "bucket_range",
    "history_promql",
    "history_queries",
    "owner_windows",
    "points_from_series",
    "split_by_owner",
    "step_seconds",
]

SCRAPE_S = 10
"""Prometheus's scrape interval: ``raw`` means one point per scrape."""
QUERY_PARTS = 4
"""Queries one history read is sent as, concurrently (measured: 4 halves a week's read)."""

_P = "dockvm_container_"
# (field, PromQL over the window W of one metric; {s} is the series selector)
_GAUGES: tuple[tuple[str, str], ...] = (
    ("cpu_percent", "avg_over_time(" + _P + "cpu_percent{s}[{w}])"),
    ("cpu_percent_max", "max_over_time(" + _P + "cpu_percent{s}[{w}])"),
    ("mem_usage", "avg_over_time(" + _P + "memory_usage_bytes{s}[{w}])"),
    ("mem_working_set", "avg_over_time(" + _P + "memory_working_set_bytes{s}[{w}])"),
    ("mem_working_set_max", "max_over_time(" + _P + "memory_working_set_bytes{s}[{w}])"),
    ("mem_limit", "last_over_time(" + _P + "memory_limit_bytes{s}[{w}])"),
    ("pids", "avg_over_time(" + _P + "pids{s}[{w}])"),
    ("samples", "count_over_time(" + _P + "memory_usage_bytes{s}[{w}])"),
)
_COUNTERS: tuple[tuple[str, str], ...] = (
    ("cpu_throttled_s", "cpu_throttled_seconds"),
    ("oom_kills", "oom_kills"),
    ("net_rx_bytes", "network_receive_bytes"),
    ("net_tx_bytes", "network_transmit_bytes"),
    ("net_rx_packets", "network_receive_packets"),
    ("net_tx_packets", "network_transmit_packets"),
    ("blk_read_bytes", "blkio_read_bytes"),
    ("blk_write_bytes", "blkio_write_bytes"),
)
_INTS = frozenset(
    {"samples", "mem_working_set_max", "mem_limit", "oom_kills"}
    | {f for f, _ in _COUNTERS if f != "cpu_throttled_s"}
)


def step_seconds(step: str) -> int:
    """The bucket width of a step (``raw``: one scrape interval)."""
    return STEPS[step] or SCRAPE_S


def history_queries(ip: str, step_s: int, parts: int = QUERY_PARTS) -> list[str]:
    """``history_promql`` cut into ``parts`` expressions of every ``parts``-th field: sent at
    once, Prometheus evaluates them on several cores (one query's ``or`` runs on one)."""
    fields = history_promql(ip, step_s).split(" or ")
    return [" or ".join(fields[i::parts]) for i in range(min(parts, len(fields)))]


def history_promql(ip: str, step_s: int) -> str:
    """The one expression answering every field of ``ip``'s history at ``step_s``."""
    sel = '{ip="' + ip + '"}'
    w = f"{step_s}s"
    parts = [expr.format(s=sel, w=w) for _, expr in _GAUGES]
    names = [f for f, _ in _GAUGES]
    for field, metric in _COUNTERS:
        series = f"{_P}{metric}_total{sel}"  # prometheus_client names counters' samples so
        if step_s >= 3 * SCRAPE_S:
            # Several scrapes per bucket: increase() (a range function, half the cost of two
            # lookups at every step, and it counts across a reset).
            parts.append(f"increase({series}[{w}])")
        else:
            # One scrape per bucket: increase() would see a single sample; the difference of
            # the two lookups is exact.
            parts.append(f"clamp_min({series} - {series} offset {w}, 0)")
        names.append(field)
    tagged = zip(names, parts, strict=True)
    return " or ".join(f'label_replace({expr}, "f", "{name}", "", "")' for name, expr in tagged)


def bucket_range(start: datetime, end: datetime, step_s: int) -> tuple[float, float]:
    """The first and last evaluation times (bucket ends, epoch s) covering ``[start, end)``."""
    first = math.floor(start.timestamp() / step_s) * step_s + step_s
    last = math.ceil(end.timestamp() / step_s) * step_s
    return float(first), float(max(first, last))


# A point as the API writes it: MetricPoint's fields, in its order, with its defaults.
_POINT = {name: f.default for name, f in MetricPoint.model_fields.items()}


def points_from_series(
    series: Iterable[Mapping[str, Any]], step_s: int, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """Points from a ``query_range`` matrix: one per (bucket, machine), in time order, as the
    plain dicts of :class:`MetricPoint`'s JSON (a week is 1,000 points of 20 fields: building
    models for them cost the gateway more than Prometheus's whole answer)."""
    rows: dict[tuple[float, str], dict[str, Any]] = {}
    lo, hi = start.timestamp() - step_s, end.timestamp()
    for s in series:
        labels = s.get("metric", {})
        field, machine = labels.get("f"), labels.get("machine_id", "")
        if not field:
            continue
        integer = field in _INTS
        for ts, raw in s.get("values", ()):
            t0 = ts - step_s
            if t0 <= lo or t0 >= hi:
                continue
            value = float(raw)
            if value != value:  # NaN
                continue
            row = rows.get((t0, machine))
            if row is None:
                row = rows[(t0, machine)] = {}
            row[field] = round(value) if integer else value
    points = []
    for (t0, machine), row in sorted(rows.items()):
        if "samples" not in row:  # only counters' differences: no sample in the bucket
            continue
        point = dict(_POINT)
        point.update(row, t=datetime.fromtimestamp(t0, UTC), machine_id=machine or None)
        points.append(point)
    return points


@dataclass(frozen=True, slots=True)
class OwnerWindow:
    """A machine holding the IP from ``start`` until ``end`` (None: still, or unknown)."""

    machine_id: str
    start: datetime | None
    end: datetime | None

    def overlaps(self, t0: datetime, t1: datetime) -> bool:
        """Whether the ownership overlaps ``[t0, t1)``."""
        return (self.start is None or self.start < t1) and (self.end is None or self.end > t0)


def owner_windows(history: Sequence[Mapping[str, Any]]) -> list[OwnerWindow]:
    """Ownership windows from ipam's allocate/release history (oldest first)."""
    out: list[OwnerWindow] = []
    holder: tuple[str, datetime] | None = None
    for entry in sorted(history, key=lambda e: e["at"]):
        mid, at = str(entry["machine_id"]), _utc(entry["at"])
        if entry["action"] == "allocated":
            if holder is not None:  # a release never recorded: the new owner ends it
                out.append(OwnerWindow(holder[0], holder[1], at))
            holder = (mid, at)
        elif holder is not None and holder[0] == mid:
            out.append(OwnerWindow(mid, holder[1], at))
            holder = None
    if holder is not None:
        out.append(OwnerWindow(holder[0], holder[1], None))
    return out


def split_by_owner(
    points: Sequence[dict[str, Any]],
    windows: Sequence[OwnerWindow] | None,
    start: datetime,
    end: datetime,
    step_s: int,
) -> tuple[list[dict[str, Any]], list[IpOwner]]:
    """Keep each machine's points within its ownership windows; name the owners in
    ``[start, end)``. No windows (ipam did not answer, or has no history of the IP): the points
    as measured, the owners from the points' machines."""
    step = timedelta(seconds=step_s)
    if not windows:  # ipam did not answer, or never leased this IP: nothing to split by
        seen = dict.fromkeys(p["machine_id"] for p in points if p["machine_id"])
        return list(points), [IpOwner(machine_id=m) for m in seen]
    kept = [
        p
        for p in points
        if any(
            w.machine_id == p["machine_id"] and w.overlaps(p["t"], p["t"] + step) for w in windows
        )
    ]
    owners = [
        IpOwner(machine_id=w.machine_id, from_=w.start, until=w.end)
        for w in windows
        if w.overlaps(start, end)
    ]
    return kept, owners


def _utc(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=UTC)
