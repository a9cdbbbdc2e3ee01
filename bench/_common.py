"""Helpers shared by the benchmark programs: medians, percentiles, and a machine line."""

from __future__ import annotations

import os
import platform
import statistics
from datetime import UTC, datetime


def median(values: list[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def machine() -> str:
    """A one-line description of where the benchmark ran."""
    return (
        f"{datetime.now(UTC):%Y-%m-%d} {platform.node()} {os.cpu_count()} cores "
        f"{platform.machine()} Python {platform.python_version()}"
    )
