"""The monitor's use-case layer: the one place that talks to Docker, the sampler, the store and
the bus on behalf of the service. History is not stored here: each round is exposed on
``/metrics`` for Prometheus to scrape and keep.

Delivery guarantee of what it publishes: lifecycle events are at least once, each under a
deterministic envelope id recorded in MongoDB first, so a copy sent again after a reconnect, a
replay or a monitor restart is dropped by consumers' dedupe; ``metrics.batch`` is at most once
per round (a round whose publish fails is logged and the next round goes on).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import structlog

from libs.common.bus import Publisher
from libs.common.clock import utcnow
from libs.common.contracts.monitor import ContainerSample, MetricsBatch

from .adapters.docker_events import Connected, Disconnected
from .domain import Emit, LifecycleTracker, Observed, retention_cutoff
from .exporter import ContainerCollector
from .sampler import Sampler, Target
from .store import MonitorStore

__all__ = ["ContainerSource", "EventSource", "MonitorService"]

log = structlog.get_logger("monitor")
_NS = 1_000_000_000


class ContainerSource(Protocol):
    """Port: the dockvm containers as the Docker API sees them."""

    async def observe(self, full: bool = True) -> list[Observed]:
        """Every dockvm container of the host (``full=False``: trust unchanged ones)."""
        ...

    async def inspect(self, container_id: str) -> Observed | None:
        """One container, or None when gone."""
        ...


class EventSource(Protocol):
    """Port: the Docker events stream with (re)connection markers."""

    def stream(self, since_ns: int = 0) -> Any:
        """An async iterator of event dicts, :class:`Connected` and :class:`Disconnected`."""
        ...


class MonitorService:
    """Samples the host's dockvm containers and turns Docker events into lifecycle events."""

    def __init__(
        self,
        *,
        host: str,
        containers: ContainerSource,
        events: EventSource,
        sampler: Sampler,
        store: MonitorStore,
        publisher: Publisher,
        tracker: LifecycleTracker,
        collector: ContainerCollector,
        interval_s: float,
        replay_max_s: float = 3600.0,
    ) -> None:
        self.host = host
        self._containers = containers
        self._events = events
        self._sampler = sampler
        self._store = store
        self._publisher = publisher
        self.tracker = tracker
        self._collector = collector
        self._interval = interval_s
        self._replay_max_ns = int(replay_max_s * _NS)
        self.targets: dict[str, Target] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitor-sampler")
        self.rounds = 0
        self.connected = False

    async def start(self) -> int:
        """Resume from the stored state (publishing what changed while the monitor was down),
        or learn the containers silently on a first start; return the event time to replay
        from (0: live only)."""
        stored = await self._store.load_tracks(self.host)
        if stored is None:
            observed = await self._containers.observe()
            self.tracker.seed(observed)
            self._set_targets(observed)
            await self._save()
            return 0
        last = await self._store.last_event_ns(self.host)
        self.tracker.restore(stored, handled_until_ns=last)
        # The resync publishes what happened while we were down; the replay of dockerd's
        # buffer that follows is then dropped as already known (same as after a cut stream).
        await self.resync()
        floor = time.time_ns() - self._replay_max_ns
        return max(last, floor) if last else 0

    async def _save(self) -> None:
        await self._store.save_tracks(self.host, self.tracker.snapshot())

    def _set_targets(self, observed: list[Observed]) -> None:
        self.targets = {
            o.meta.container_id: Target(o.meta, o.pid) for o in observed if o.running and o.pid
        }

    async def sample_round(self) -> list[ContainerSample]:
        """Sample every running container; expose and publish the round."""
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(self._pool, self._sampler.round, dict(self.targets))
        samples = [s for s, _ in results]
        self._collector.update(samples)
        at = utcnow()
        rated = [(s, d) for s, d in results if s.cpu_percent is not None]
        self.rounds += 1
        await self._publisher.publish(
            MetricsBatch(
                host=self.host, at=at, interval_s=self._interval, samples=[s for s, _ in rated]
            )
        )
        return samples

    async def prune(self, days: float) -> int:
        """Delete the published lifecycle records older than ``days`` (their dedupe is over)."""
        n = await self._store.prune(retention_cutoff(utcnow(), days))
        if n:
            log.info("lifecycle records pruned", deleted=n, days=days)
        return n

    async def resync(self, full: bool = True) -> None:
        """Compare the API's view with ours; publish what the events stream missed."""
        observed = await self._containers.observe(full)
        emits = self.tracker.resync(observed, now_ns=time.time_ns())
        self._set_targets(observed)
        if emits:
            log.info("resync found missed transitions", count=len(emits))
        await self._publish(emits)
        await self._save()

    async def follow_events(self, since_ns: int = 0) -> None:
        """Handle the events stream for the life of the service."""
        async for item in self._events.stream(since_ns):
            try:
                await self.handle(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("docker event handling failed", item=repr(item)[:300])

    async def handle(self, item: Mapping[str, Any] | Connected | Disconnected) -> None:
        """One item of the events stream."""
        if isinstance(item, Connected):
            self.connected = True
            log.info("docker events connected", reconnect=item.reconnect)
            if item.reconnect:
                await self.resync()
            return
        if isinstance(item, Disconnected):
            if self.connected:  # once per outage, not once per reconnect attempt
                log.warning("docker events stream lost, reconnecting", error=item.error)
            self.connected = False
            return
        emits = self.tracker.on_event(item)
        action = str(item.get("Action") or item.get("status") or "")
        cid = str((item.get("Actor") or {}).get("ID") or item.get("id") or "")
        if action in ("start", "restart") and cid:
            observed = await self._containers.inspect(cid)
            if observed is not None and observed.running and observed.pid:
                self.targets[cid] = Target(observed.meta, observed.pid)
        elif action in ("die", "destroy"):
            self.targets.pop(cid, None)
        elif action == "update":  # a resize: quota and limit are re-read next round
            self._sampler.forget(cid)
        await self._publish(emits)
        if emits or action == "destroy":
            await self._save()
        time_ns = int(item.get("timeNano") or 0)
        if time_ns:
            await self._store.set_last_event_ns(self.host, time_ns)

    async def _publish(self, emits: list[Emit]) -> None:
        for emit in emits:
            if not await self._store.claim_event(self.host, emit):
                continue
            self._collector.note(emit.message)
            await self._publisher.publish(emit.message, id=emit.id)
            await self._store.event_published(emit)
            log.info(
                "lifecycle event",
                type=emit.message.TYPE,
                machine_id=getattr(emit.message, "machine_id", None),
            )

    async def republish(self, older_than_s: float = 30.0) -> int:
        """Send again the lifecycle events recorded but never confirmed (a publish failed)."""
        emits = await self._store.unpublished(self.host, older_than_s)
        await self._publish(emits)
        return len(emits)

    def close(self) -> None:
        """Stop the sampler thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)
