"""The monitor's contracts, its query handler and its service, with in-memory fakes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from libs.common.bus import MemoryPublisher
from libs.common.contracts import Envelope
from libs.common.contracts.monitor import MetricsQuery
from libs.common.errors import TransientError, ValidationFailed
from services.monitor.adapters import Connected, Disconnected
from services.monitor.domain import (
    CgroupStats,
    ContainerMeta,
    LifecycleTracker,
    NetStats,
    Observed,
)
from services.monitor.exporter import ContainerCollector
from services.monitor.fakes import MemoryMonitorStore
from services.monitor.sampler import Sampler
from services.monitor.service import MonitorService

NS = 1_000_000_000
NOW = datetime.now(UTC)


def _query(**kw) -> dict:
    base = {"ip": "10.0.0.5", "from": "2026-11-20T00:00:00Z", "to": "2026-11-27T00:00:00Z",
            "step": "10m"}
    base.update(kw)
    return base


def test_query_round_trips_with_from_on_the_wire():
    env = Envelope.wrap(MetricsQuery.model_validate(_query()), source="gateway")
    assert "from" in env.data
    parsed = Envelope.from_bytes(env.to_bytes()).parse()
    assert isinstance(parsed, MetricsQuery)
    assert parsed.from_ == datetime(2026, 11, 20, tzinfo=UTC)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"to": "2026-11-19T00:00:00Z"}, "to must be after from"),
        ({"from": "2026-11-20T00:00:00"}, "need a timezone"),
        ({"step": "5m"}, "step"),
        ({"step": "raw"}, "more than"),
        ({"ip": "10.0.0.300"}, "ip"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_queries_are_refused_with_a_reason(override, message):
    env = Envelope(type="metrics.query", source="t", data=_query(**override))
    with pytest.raises(ValidationFailed, match=message):
        env.parse()


class FakeCgroups:
    """CPU grows by ``per_round`` CPU-seconds per read; memory stays put."""

    version = "v1"

    def __init__(self, per_round_ns: int) -> None:
        self.cpu: dict[str, int] = {}
        self.per_round = per_round_ns
        self.forgotten: list[str] = []

    def read(self, cid: str, pid: int | None) -> CgroupStats:
        self.cpu[cid] = self.cpu.get(cid, 0) + self.per_round
        return CgroupStats(
            cpu_usage_ns=self.cpu[cid], nr_periods=0, nr_throttled=0, throttled_ns=0,
            quota_cpus=0.5, mem_usage=300, mem_limit=1000, mem_rss=200, mem_cache=100,
            mem_inactive_file=50, oom_kills=0, blk_read_bytes=0, blk_write_bytes=0,
            blk_read_ops=0, blk_write_ops=0, pids=2,
        )

    def forget(self, cid: str) -> None:
        self.forgotten.append(cid)


class FakeDocker:
    """Containers as a dict; ``observe``/``inspect`` read it."""

    def __init__(self, observed: list[Observed]) -> None:
        self.observed = {o.meta.container_id: o for o in observed}

    async def observe(self, full: bool = True) -> list[Observed]:
        return list(self.observed.values())

    async def inspect(self, cid: str) -> Observed | None:
        return self.observed.get(cid)


class FakeEvents:
    def __init__(self, items: list) -> None:
        self.items = items

    async def stream(self, since_ns: int = 0):
        for item in self.items:
            yield item


META = ContainerMeta("c1", "m-1", "10.0.0.5", "shop")


def _observed(running: bool = True, started_s: int = 0, pid: int = 42) -> Observed:
    return Observed(meta=META, running=running, started_ns=started_s * NS, finished_ns=0,
                    exit_code=0, oom_killed=False, pid=pid if running else None)


def _monitor(docker: FakeDocker, events: list | None = None, clock=None):
    ticks = iter(range(0, 10_000, 10))
    wall = (NOW + timedelta(seconds=s) for s in range(0, 10_000, 10))  # in step with ``ticks``
    store, pub = MemoryMonitorStore(), MemoryPublisher("monitor")
    collector = ContainerCollector("h1")
    mon = MonitorService(
        host="h1", containers=docker, events=FakeEvents(events or []),
        sampler=Sampler(FakeCgroups(5 * NS), lambda pid: NetStats(), host_cpus=2,
                        host_memory=4000, clock=clock or (lambda: float(next(ticks))),
                        wall_clock=lambda: next(wall)),
        store=store, publisher=pub, tracker=LifecycleTracker("h1"), collector=collector,
        interval_s=10,
    )
    return mon, store, pub, collector


async def test_rounds_publish_and_expose_samples():
    mon, _store, pub, collector = _monitor(FakeDocker([_observed()]))
    await mon.start()
    await mon.sample_round()
    await mon.sample_round()
    (batch_1, batch_2) = pub.of_type("metrics.batch")
    exposed = [m for m in collector.collect() if m.name == "dockvm_container_cpu_percent"]
    assert (len(batch_1.samples), len(batch_2.samples)) == (0, 1)  # the first has no rate yet
    assert batch_2.samples[0].cpu_percent == pytest.approx(100.0)  # 0.5 CPU-s/s on 0.5
    assert exposed[0].samples[0].labels == {
        "ip": "10.0.0.5", "machine_id": "m-1", "app": "shop", "host": "h1"
    }


async def test_lifecycle_counters_start_at_zero_and_count_restarts_and_oom_kills():
    mon, _store, _, collector = _monitor(FakeDocker([_observed()]))
    await mon.start()
    await mon.sample_round()
    before = _counters(collector)
    attrs = {"dockvm.machine_id": "m-1", "dockvm.ip": "10.0.0.5", "dockvm.app": "shop"}
    base = {"Type": "container", "Actor": {"ID": "c1", "Attributes": attrs}}
    for action, at in (("oom", 20), ("die", 21), ("start", 22)):
        await mon.handle({**base, "Action": action, "timeNano": at * NS})
    assert before == {"dockvm_container_restarts": 0, "dockvm_container_oom_events": 0}
    assert _counters(collector) == {
        "dockvm_container_restarts": 1, "dockvm_container_oom_events": 1
    }


def _counters(collector: ContainerCollector) -> dict[str, float]:
    names = ("dockvm_container_restarts", "dockvm_container_oom_events")
    return {m.name: m.samples[0].value for m in collector.collect() if m.name in names}


async def test_events_update_targets_and_publish_once_with_deterministic_ids():
    start = {"Type": "container", "Action": "start", "timeNano": 5 * NS,
             "Actor": {"ID": "c1", "Attributes": {"dockvm.machine_id": "m-1"}}}
    die = {**start, "Action": "die", "timeNano": 9 * NS}
    items = [Connected(False), start, start, Disconnected("cut"), Connected(True), die]
    docker = FakeDocker([_observed(started_s=5)])
    mon, store, pub, _ = _monitor(docker, items)
    docker.observed.clear()
    await mon.start()
    docker.observed["c1"] = _observed(started_s=5)
    await mon.follow_events()
    types = [env.type for _, env in pub.sent]
    assert types == ["container.started", "container.died"]
    assert await store.last_event_ns("h1") == 9 * NS
    assert mon.targets == {}


async def test_a_lifecycle_event_already_published_is_not_sent_again():
    docker = FakeDocker([])
    mon, _store, pub, _ = _monitor(docker)
    start = {"Type": "container", "Action": "start", "timeNano": 5 * NS,
             "Actor": {"ID": "c1", "Attributes": {"dockvm.machine_id": "m-1"}}}
    await mon.handle(start)
    mon.tracker = LifecycleTracker("h1")  # a restarted monitor, replaying the same event
    await mon.handle(start)
    assert [env.type for _, env in pub.sent] == ["container.started"]


class FlakyPublisher(MemoryPublisher):
    """Fails its first publish, as a broker outage would."""

    def __init__(self) -> None:
        super().__init__("monitor")
        self.failures = 1

    async def publish(self, msg, **kw):
        if self.failures:
            self.failures -= 1
            raise TransientError("broker away")
        return await super().publish(msg, **kw)


async def test_a_lifecycle_event_whose_publish_failed_is_sent_by_the_republish_job():
    mon, _store, _, _ = _monitor(FakeDocker([]))
    pub = mon._publisher = FlakyPublisher()
    start = {"Type": "container", "Action": "start", "timeNano": 5 * NS,
             "Actor": {"ID": "c1", "Attributes": {"dockvm.machine_id": "m-1"}}}
    with pytest.raises(TransientError):
        await mon.handle(start)
    sent = await mon.republish(older_than_s=0)
    assert (sent, [env.type for _, env in pub.sent]) == (1, ["container.started"])
    assert await mon.republish(older_than_s=0) == 0


async def test_a_restarted_monitor_publishes_what_changed_while_it_was_down():
    docker = FakeDocker([_observed(started_s=5)])
    first, store, _, _ = _monitor(docker)
    await first.start()
    docker.observed.clear()  # destroyed while no monitor ran
    second, _, pub, _ = _monitor(docker)
    second._store = store
    await second.start()
    (died,) = pub.of_type("container.died")
    assert (died.machine_id, died.synthesized, second.targets) == ("m-1", True, {})
