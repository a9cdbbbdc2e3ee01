"""The gateway's reads of Prometheus's HTTP API: an IP's metrics history (``query_range``).

Errors are translated here: Prometheus unreachable, timing out or answering 5xx is a
:class:`TransientError` (the API answers 503); a query Prometheus refuses (4xx) is a bug of
ours, raised as it is. A range longer than Prometheus's 11,000 points per series is read in
chunks, concurrently.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import aiohttp
from pydantic_core import from_json

from libs.common.errors import TransientError

from ..domain.metrics import bucket_range, history_queries, points_from_series

__all__ = ["PrometheusClient"]

_MAX_POINTS = 10_000  # per series and request; Prometheus refuses over 11,000


class PrometheusClient:
    """Queries one Prometheus over HTTP with the gateway's shared session."""

    def __init__(self, url: str, session: aiohttp.ClientSession, timeout_s: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def query_range(self, promql: str, start: float, end: float, step_s: int) -> list[dict]:
        """The matrix of ``promql`` evaluated every ``step_s`` from ``start`` to ``end``."""
        span = _MAX_POINTS * step_s
        chunks = []
        t = start
        while t <= end:
            chunks.append((t, min(end, t + span - step_s)))
            t += span
        parts = await asyncio.gather(*(self._range(promql, a, b, step_s) for a, b in chunks))
        if len(parts) == 1:
            return parts[0]
        merged: dict[tuple, dict[str, Any]] = {}
        for part in parts:
            for s in part:
                key = tuple(sorted(s["metric"].items()))
                merged.setdefault(key, {"metric": s["metric"], "values": []})["values"] += s[
                    "values"
                ]
        return list(merged.values())

    async def _range(self, promql: str, start: float, end: float, step_s: int) -> list[dict]:
        form = {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": str(step_s)}
        try:
            async with self._session.post(
                f"{self.url}/api/v1/query_range", data=form, timeout=self._timeout
            ) as r:
                if r.status >= 500:
                    raise TransientError(f"prometheus answered {r.status}: {await r.text()}")
                # pydantic's JSON parser: several times json.loads's speed on a week's answer.
                body = from_json(await r.read())
        except (aiohttp.ClientError, TimeoutError) as err:
            raise TransientError(f"prometheus at {self.url} unreachable: {err!r}") from err
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus refused the query: {body.get('error')}")
        return list(body["data"]["result"])

    async def ip_history(
        self, ip: str, start: datetime, end: datetime, step_s: int
    ) -> list[dict[str, Any]]:
        """Every field of ``ip``'s history in ``[start, end)`` at ``step_s``, one point per
        (bucket, machine)."""
        first, last = bucket_range(start, end, step_s)
        parts = await asyncio.gather(
            *(self.query_range(q, first, last, step_s) for q in history_queries(ip, step_s))
        )
        return points_from_series([s for part in parts for s in part], step_s, start, end)
