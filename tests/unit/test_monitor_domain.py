"""Pure logic of the monitor: sample math, downsampling, lifecycle tracking and flapping."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from libs.common.contracts import Envelope
from libs.common.contracts.monitor import (
    ContainerDied,
    ContainerFlapping,
    ContainerRestarted,
    ContainerStarted,
    MetricsBatch,
)
from services.monitor.domain import (
    CgroupStats,
    ContainerMeta,
    LifecycleTracker,
    NetStats,
    Observed,
    Reading,
    build_sample,
    counter_delta,
    cpu_percent,
    effective_limit,
    event_id,
    working_set,
)

NS = 1_000_000_000
T0 = 1_800_000_000 * NS
LABELS = {"dockvm.machine_id": "m-1", "dockvm.ip": "10.0.0.5", "dockvm.app": "shop"}


@pytest.mark.parametrize(
    ("prev", "cur", "elapsed", "quota", "expected"),
    [
        (0, 5 * NS, 10.0, 0.5, 100.0),  # 0.5 CPU-s per s under a 0.5 quota: the quota is full
        (0, 25 * NS // 10, 10.0, 0.5, 50.0),
        (0, 10 * NS, 10.0, 2.0, 50.0),
        (7 * NS, 2 * NS, 2.0, 1.0, 100.0),  # counter reset: count from zero
        (0, NS, 0.0, 1.0, 0.0),
    ],
)
def test_cpu_percent_is_relative_to_the_quota(prev, cur, elapsed, quota, expected):
    assert cpu_percent(prev, cur, elapsed, quota) == pytest.approx(expected)


@pytest.mark.parametrize(("usage", "inactive", "expected"), [(100, 30, 70), (10, 30, 0)])
def test_working_set_subtracts_inactive_file_and_never_goes_negative(usage, inactive, expected):
    assert working_set(usage, inactive) == expected


@pytest.mark.parametrize(("prev", "cur", "expected"), [(5, 9, 4), (9, 3, 3), (4, 4, 0)])
def test_counter_delta_handles_resets(prev, cur, expected):
    assert counter_delta(prev, cur) == expected


@pytest.mark.parametrize(
    ("limit", "expected"), [(None, 8 << 30), (9223372036854771712, 8 << 30), (1 << 30, 1 << 30)]
)
def test_an_unlimited_container_sees_the_host_memory(limit, expected):
    assert effective_limit(limit, 8 << 30) == expected


def _cg(cpu_ns: int = 0, **kw) -> CgroupStats:
    base = dict(
        cpu_usage_ns=cpu_ns, nr_periods=0, nr_throttled=0, throttled_ns=0, quota_cpus=0.5,
        mem_usage=200, mem_limit=1 << 30, mem_rss=100, mem_cache=100, mem_inactive_file=40,
        oom_kills=0, blk_read_bytes=0, blk_write_bytes=0, blk_read_ops=0, blk_write_ops=0, pids=3,
    )
    base.update(kw)
    return CgroupStats(**base)


def _reading(mono: float, cg: CgroupStats, net: NetStats | None = None) -> Reading:
    at = datetime.fromtimestamp(T0 / NS + mono, UTC)
    return Reading(at=at, mono_s=mono, cgroup=cg, net=net or NetStats())


META = ContainerMeta("c1", "m-1", "10.0.0.5", "shop")


def test_first_sample_has_no_rate_then_rates_and_deltas_follow():
    first, d0 = build_sample(META, _reading(0, _cg(0)), None, host_cpus=4, host_memory=8 << 30)
    second, d1 = build_sample(
        META,
        _reading(10, _cg(int(2.5 * NS), throttled_ns=NS), NetStats(1000, 500, 10, 5)),
        _reading(0, _cg(0), NetStats(400, 100, 4, 1)),
        host_cpus=4,
        host_memory=8 << 30,
    )
    assert (first.cpu_percent, d0) == (None, {})
    assert second.cpu_percent == pytest.approx(50.0)
    assert second.mem_working_set == 160
    assert (d1["net_rx_bytes"], d1["net_tx_bytes"], d1["cpu_throttled_s"]) == (600, 400, 1.0)


def test_without_a_quota_the_host_cpus_are_the_quota():
    sample, _ = build_sample(
        META, _reading(1, _cg(2 * NS, quota_cpus=None)), _reading(0, _cg(0, quota_cpus=None)),
        host_cpus=4, host_memory=8 << 30,
    )
    assert (sample.cpu_quota_cpus, sample.cpu_percent) == (4.0, 50.0)


def _ev(action: str, t_ns: int, cid: str = "c1", **attrs: str) -> dict:
    return {
        "Type": "container", "Action": action, "timeNano": t_ns, "time": t_ns // NS,
        "Actor": {"ID": cid, "Attributes": {**LABELS, **attrs}},
    }


def _types(emits) -> list[str]:
    return [e.message.TYPE for e in emits]


def _run(tracker: LifecycleTracker, *events: dict) -> list[str]:
    out = []
    for e in events:
        out += _types(tracker.on_event(e))
    return out


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        pytest.param(
            [_ev("create", T0), _ev("start", T0 + 1)], ["container.started"], id="first start"
        ),
        pytest.param(
            [_ev("start", T0), _ev("kill", T0 + NS), _ev("die", T0 + 2 * NS, exitCode="137"),
             _ev("stop", T0 + 3 * NS), _ev("start", T0 + 4 * NS), _ev("restart", T0 + 5 * NS)],
            ["container.started", "container.died", "container.started", "container.restarted"],
            id="docker restart",
        ),
        pytest.param(
            [_ev("start", T0), _ev("die", T0 + NS, exitCode="1"), _ev("start", T0 + 2 * NS)],
            ["container.started", "container.died", "container.started", "container.restarted"],
            id="restart policy",
        ),
        pytest.param(
            [_ev("start", T0), _ev("oom", T0 + NS), _ev("die", T0 + 2 * NS, exitCode="137")],
            ["container.started", "container.oom_killed", "container.died"],
            id="oom",
        ),
        pytest.param(
            [_ev("start", T0), _ev("health_status: healthy", T0 + NS),
             _ev("health_status: healthy", T0 + 2 * NS),
             _ev("health_status: unhealthy", T0 + 3 * NS)],
            ["container.started", "container.health", "container.health"],
            id="health changes only",
        ),
        pytest.param(
            [_ev("start", T0), _ev("die", T0 + NS), _ev("start", T0), _ev("die", T0 + NS)],
            ["container.started", "container.died"],
            id="replayed events are dropped",
        ),
        pytest.param(
            [{"Type": "container", "Action": "start", "timeNano": T0,
              "Actor": {"ID": "x", "Attributes": {"name": "not-ours"}}}],
            [],
            id="unlabelled container",
        ),
    ],
)
def test_docker_events_become_lifecycle_events(events, expected):
    assert _run(LifecycleTracker("h1"), *events) == expected


def test_died_carries_exit_code_and_oom_flag():
    tracker = LifecycleTracker("h1")
    tracker.on_event(_ev("start", T0))
    tracker.on_event(_ev("oom", T0 + NS))
    (died,) = [e.message for e in tracker.on_event(_ev("die", T0 + 2 * NS, exitCode="137"))]
    assert isinstance(died, ContainerDied)
    assert (died.exit_code, died.oom_killed, died.machine_id, str(died.ip)) == (
        137, True, "m-1", "10.0.0.5"
    )


def _loop(tracker: LifecycleTracker, restarts: int, gap_s: int) -> list:
    emits = tracker.on_event(_ev("start", T0))
    for i in range(1, restarts + 1):
        t = T0 + i * gap_s * NS
        emits += tracker.on_event(_ev("die", t - NS // 2, exitCode="1"))
        emits += tracker.on_event(_ev("start", t))
    return [e.message for e in emits]


@pytest.mark.parametrize(("restarts", "gap_s", "flaps"), [(3, 10, 1), (6, 10, 1), (2, 10, 0),
                                                          (3, 200, 0)])
def test_flapping_after_three_restarts_in_five_minutes_once(restarts, gap_s, flaps):
    msgs = _loop(LifecycleTracker("h1", window_s=300, threshold=3), restarts, gap_s)
    assert len([m for m in msgs if isinstance(m, ContainerFlapping)]) == flaps
    assert len([m for m in msgs if isinstance(m, ContainerRestarted)]) == restarts


def _obs(running: bool, started_s: float, finished_s: float = 0, code: int = 0) -> Observed:
    return Observed(
        meta=ContainerMeta("c1", "m-1", "10.0.0.5", "shop"), running=running,
        started_ns=int(T0 + started_s * NS), finished_ns=int(T0 + finished_s * NS),
        exit_code=code, oom_killed=False, pid=42 if running else None,
    )


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        pytest.param(_obs(True, 0.2), [], id="same run: nothing missed"),
        pytest.param(_obs(False, 0, 30, 3), ["container.died"], id="died during the cut"),
        pytest.param(
            _obs(True, 40),
            ["container.died", "container.started", "container.restarted"],
            id="restarted during the cut",
        ),
    ],
)
def test_resync_emits_only_what_the_stream_missed(after, expected):
    tracker = LifecycleTracker("h1")
    tracker.on_event(_ev("start", T0))
    assert _types(tracker.resync([after])) == expected


def test_resync_then_replayed_events_do_not_duplicate():
    tracker = LifecycleTracker("h1")
    tracker.on_event(_ev("start", T0))
    synth = tracker.resync([_obs(False, 0, 30, 3)])
    replayed = tracker.on_event(_ev("die", T0 + 30 * NS, exitCode="3"))
    assert (_types(synth), replayed) == (["container.died"], [])


def test_seed_emits_nothing_and_knows_the_run():
    tracker = LifecycleTracker("h1")
    tracker.seed([_obs(True, 0)])
    assert (_types(tracker.resync([_obs(True, 0)])), tracker.running_ids()) == ([], {"c1"})


def test_a_new_container_seen_first_by_resync_is_started_not_restarted():
    tracker = LifecycleTracker("h1")
    assert [type(e.message) for e in tracker.resync([_obs(True, 5)])] == [ContainerStarted]


def test_event_ids_are_deterministic_per_event():
    assert event_id("c", "die", 1) == event_id("c", "die", 1) != event_id("c", "die", 2)


def test_retention_window_is_days_back():
    from services.monitor.domain import retention_cutoff

    now = datetime(2026, 11, 27, tzinfo=UTC)
    assert retention_cutoff(now, 8) == now - timedelta(days=8)


@pytest.mark.parametrize(("label", "expected"), [("10.0.0.5", "10.0.0.5"), ("nope", None),
                                                 (None, None)])
def test_a_sample_carries_the_ip_label_parsed_or_none(label, expected):
    meta = ContainerMeta("c1", "m-1", label, None)
    sample, _ = build_sample(meta, _reading(0, _cg()), None, host_cpus=1, host_memory=1 << 30)
    assert (str(sample.ip) if sample.ip else None) == expected
    assert Envelope.from_bytes(
        Envelope.wrap(MetricsBatch(host="h", at=sample.at, interval_s=1, samples=[sample]),
                      source="t").to_bytes()
    ).parse().samples[0].machine_id == "m-1"


def test_resync_reports_a_running_container_that_vanished_as_died():
    tracker = LifecycleTracker("h1")
    tracker.on_event(_ev("start", T0))
    (died,) = tracker.resync([], now_ns=T0 + 60 * NS)
    assert isinstance(died.message, ContainerDied)
    assert (died.message.synthesized, died.message.exit_code) == (True, None)
    assert tracker.resync([], now_ns=T0 + 61 * NS) == []


def test_a_restored_tracker_resumes_where_the_snapshot_was():
    first = LifecycleTracker("h1")
    first.on_event(_ev("start", T0))
    first.on_event(_ev("die", T0 + NS, exitCode="1"))
    first.on_event(_ev("start", T0 + 2 * NS))
    resumed = LifecycleTracker("h1")
    resumed.restore(first.snapshot())
    replayed = resumed.on_event(_ev("start", T0 + 2 * NS))
    again = resumed.on_event(_ev("die", T0 + 3 * NS, exitCode="1")) + resumed.on_event(
        _ev("start", T0 + 4 * NS)
    )
    assert replayed == []  # the replay of a run it already knew
    assert [e.message.restarts_in_window for e in again if e.message.TYPE.endswith("restarted")
            ] == [2]
