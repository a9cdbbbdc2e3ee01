"""Bus entrypoints of the monitor: none. It publishes (lifecycle events, ``metrics.batch``) and
consumes nothing: history queries are answered by the gateway from Prometheus, which scrapes
each monitor's ``/metrics``. The file stays so that every service has the same anatomy.
"""

from __future__ import annotations

__all__: list[str] = []
