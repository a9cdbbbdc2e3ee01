"""Wiring of the monitor service: the one place adapters meet handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import REGISTRY

from libs.common.runner import ServiceContext

from .adapters import (
    DockerEngine,
    DockerEvents,
    NetnsReader,
    host_cpus,
    host_memory,
    make_reader,
    raise_fd_limit,
)
from .domain import LifecycleTracker
from .exporter import ContainerCollector
from .sampler import Sampler
from .service import MonitorService
from .settings import MonitorSettings
from .store import MongoMonitorStore

__all__ = ["lifespan"]


@asynccontextmanager
async def lifespan(ctx: ServiceContext) -> AsyncIterator[None]:
    """Wire the monitor service for the life of the process."""
    settings = ctx.settings
    assert isinstance(settings, MonitorSettings)
    store = MongoMonitorStore(ctx.db)
    await store.setup()
    engine = DockerEngine(
        settings.docker_url, workers=settings.docker_workers, label=settings.monitor_label
    )
    events = DockerEvents(settings.docker_url, label=settings.monitor_label)
    proc = settings.monitor_proc_root
    raise_fd_limit()
    net = NetnsReader(proc)
    sampler = Sampler(
        make_reader(settings.monitor_cgroup_root, proc),
        net,
        host_cpus=host_cpus(),
        host_memory=host_memory(proc),
    )
    collector = ContainerCollector(settings.host_id)
    monitor = MonitorService(
        host=settings.host_id,
        containers=engine,
        events=events,
        sampler=sampler,
        store=store,
        publisher=ctx.publisher,
        tracker=LifecycleTracker(
            settings.host_id,
            window_s=settings.monitor_flap_window_s,
            threshold=settings.monitor_flap_threshold,
        ),
        collector=collector,
        interval_s=settings.monitor_interval_s,
        replay_max_s=settings.monitor_replay_max_s,
    )
    await engine.ping()
    since = await monitor.start()
    REGISTRY.register(collector)
    try:
        ctx.spawn(monitor.follow_events(since), "docker-events")
        ctx.every(settings.monitor_interval_s, monitor.sample_round, "sample")
        ctx.every(
            settings.monitor_resync_every_s,
            lambda: monitor.resync(full=False),
            "resync",
            now=False,
        )
        ctx.every(
            settings.monitor_retention_every_s,
            lambda: monitor.prune(settings.monitor_retention_days),
            "lifecycle-retention",
        )
        ctx.every(30, monitor.republish, "republish-lifecycle", now=False)
        ctx.add_check("docker", engine.ping)
        yield
    finally:
        REGISTRY.unregister(collector)
        events.close()
        monitor.close()
        engine.close()
        net.close()
