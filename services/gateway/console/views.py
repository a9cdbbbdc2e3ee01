"""What the console's pages show, computed from the ``/v1`` API's answers: pure functions.

The plot's columns are uPlot's data layout (one array of epoch seconds, one array per series,
``None`` where a bucket has no sample), so the page's script hands them to uPlot untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ..domain.states import State

__all__ = [
    "RANGES",
    "STATES",
    "Range",
    "human_bytes",
    "owner_marks",
    "parse_time",
    "plot_columns",
    "window",
]

# The list's state filter offers every state the API knows.
STATES = tuple(s.value for s in State)


@dataclass(frozen=True, slots=True)
class Range:
    """A plot window: its length and the API step that gives ~1,000 points or fewer."""

    name: str
    seconds: int
    step: str
    step_s: int


RANGES = {
    r.name: r
    for r in (
        Range("1h", 3600, "10s", 10),
        Range("1d", 86400, "1m", 60),
        Range("1w", 7 * 86400, "10m", 600),
    )
}


def window(name: str, now: datetime) -> tuple[Range, dict[str, str]]:
    """The range called ``name`` (1h if unknown) and the metrics query that reads it."""
    r = RANGES.get(name, RANGES["1h"])
    start = now - timedelta(seconds=r.seconds)
    return r, {"from": start.isoformat(), "to": now.isoformat(), "step": r.step}


def parse_time(value: str | None) -> datetime | None:
    """An API time (ISO 8601, ``Z`` or an offset) as an aware datetime."""
    if not value:
        return None
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def _epoch(value: str | None) -> float | None:
    at = parse_time(value)
    return None if at is None else at.timestamp()


def _rate(total: float | None, step_s: int) -> float | None:
    return None if total is None else round(total / step_s, 3)


def plot_columns(points: list[dict[str, Any]], step_s: int, cpus: float | None) -> dict[str, Any]:
    """uPlot's columns from an IP's metric points: CPU (% of quota and cores), memory and its
    limit, network and disk in bytes per second (the counters are sums over a bucket)."""
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "t", "cpu_percent", "cpu_cores", "mem_working_set", "mem_limit", "net_rx", "net_tx",
            "disk_read", "disk_write",
        )
    }  # fmt: skip
    for p in points:
        pct = p.get("cpu_percent")
        cols["t"].append(_epoch(p["t"]))
        cols["cpu_percent"].append(pct)
        cols["cpu_cores"].append(None if pct is None or not cpus else round(pct * cpus / 100, 4))
        cols["mem_working_set"].append(p.get("mem_working_set"))
        cols["mem_limit"].append(p.get("mem_limit"))
        cols["net_rx"].append(_rate(p.get("net_rx_bytes"), step_s))
        cols["net_tx"].append(_rate(p.get("net_tx_bytes"), step_s))
        cols["disk_read"].append(_rate(p.get("blk_read_bytes"), step_s))
        cols["disk_write"].append(_rate(p.get("blk_write_bytes"), step_s))
    return cols


def owner_marks(owners: list[dict[str, Any]], start: datetime, end: datetime) -> list[dict]:
    """The machines that held the IP, as spans on the plot's time axis (clipped to it)."""
    lo, hi = start.timestamp(), end.timestamp()
    marks = []
    for o in owners:
        since = _epoch(o.get("from"))
        until = _epoch(o.get("until"))
        marks.append(
            {
                "machine_id": o["machine_id"],
                "from": max(lo, since) if since is not None else lo,
                "until": min(hi, until) if until is not None else hi,
            }
        )
    return marks


def human_bytes(value: float | int | None) -> str:
    """1.5 GiB, 256 MiB, 12 KiB: bytes as a person reads them."""
    if value is None:
        return "-"
    n = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
