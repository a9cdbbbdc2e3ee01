"""Unit tests of an IP's history read from Prometheus: the PromQL, the points, the owner split."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from libs.common.contracts.monitor import MetricPoint, MetricsQuery
from services.gateway.api.prometheus import sd_targets
from services.gateway.domain.metrics import (
    bucket_range,
    history_promql,
    history_queries,
    owner_windows,
    points_from_series,
    split_by_owner,
    step_seconds,
)

T0 = datetime(2026, 11, 27, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("step", "seconds"), [("raw", 10), ("10s", 10), ("1m", 60), ("10m", 600), ("1h", 3600)]
)
def test_steps_old_words_and_prometheus_spellings(step: str, seconds: int):
    q = MetricsQuery.model_validate({"ip": "10.0.0.5", "from": T0, "to": T0 + timedelta(hours=1),
                                     "step": step})
    assert (q.step, step_seconds(step)) == (step, seconds)


def test_an_unknown_step_is_refused():
    with pytest.raises(ValueError, match="step"):
        MetricsQuery.model_validate({"ip": "10.0.0.5", "from": T0, "to": T0 + timedelta(hours=1),
                                     "step": "5m"})


def test_one_expression_names_every_field_of_the_ip_only():
    q = history_promql("10.0.0.5", 600)
    assert q.count('{ip="10.0.0.5"}') == 16
    assert q.count(" or ") == 15
    assert '"f", "net_rx_bytes"' in q and "increase(dockvm_container_oom_kills_total" in q


def test_a_bucket_of_one_scrape_reads_counters_as_an_exact_difference():
    q = history_promql("10.0.0.5", 10)
    assert "increase(" not in q and "offset 10s" in q


def test_buckets_are_evaluated_at_their_end():
    first, last = bucket_range(T0 + timedelta(seconds=5), T0 + timedelta(minutes=2), 60)
    assert (first, last) == (T0.timestamp() + 60, T0.timestamp() + 120)


def _series(field: str, machine: str, values: list[tuple[float, float]]) -> dict:
    return {"metric": {"f": field, "machine_id": machine, "ip": "10.0.0.5"},
            "values": [[t, str(v)] for t, v in values]}


def test_points_are_one_per_bucket_and_machine_at_the_bucket_start():
    t = T0.timestamp()
    series = [
        _series("samples", "m-a", [(t + 60, 6), (t + 120, 6)]),
        _series("cpu_percent", "m-a", [(t + 60, 12.5), (t + 120, 50)]),
        _series("net_rx_bytes", "m-a", [(t + 60, 100), (t + 120, 300)]),
        _series("samples", "m-b", [(t + 120, 3)]),
        _series("net_rx_bytes", "m-b", [(t + 180, 7)]),  # no sample in that bucket: dropped
    ]
    points = points_from_series(series, 60, T0, T0 + timedelta(minutes=3))
    got = [(p["t"], p["machine_id"], p["samples"], p["cpu_percent"], p["net_rx_bytes"])
           for p in points]
    assert got == [
        (T0, "m-a", 6, 12.5, 100),
        (T0 + timedelta(minutes=1), "m-a", 6, 50.0, 300),
        (T0 + timedelta(minutes=1), "m-b", 3, None, 0),
    ]
    # The API's contract: each point is a MetricPoint, field for field.
    assert [MetricPoint.model_validate(p).model_dump() for p in points] == points


def _hist(machine: str, action: str, minutes: int) -> dict:
    return {"machine_id": machine, "action": action, "at": T0 + timedelta(minutes=minutes)}


def test_ip_reused_splits_the_series_at_the_change_of_owner():
    history = [_hist("m-a", "allocated", 0), _hist("m-a", "released", 30),
               _hist("m-b", "allocated", 45)]
    t = T0.timestamp()
    series = [
        _series("samples", "m-a", [(t + 600 * k, 60) for k in range(1, 8)]),  # a stale tail
        _series("samples", "m-b", [(t + 600 * k, 60) for k in range(5, 8)]),
    ]
    end = T0 + timedelta(hours=1)
    points = points_from_series(series, 600, T0, end)
    kept, owners = split_by_owner(points, owner_windows(history), T0, end, 600)
    assert [(p["t"].minute, p["machine_id"]) for p in kept] == [
        (0, "m-a"), (10, "m-a"), (20, "m-a"), (40, "m-b"), (50, "m-b")
    ]
    assert [(o.machine_id, o.from_, o.until) for o in owners] == [
        ("m-a", T0, T0 + timedelta(minutes=30)), ("m-b", T0 + timedelta(minutes=45), None)
    ]


def test_without_ipam_the_points_stay_as_measured():
    points = points_from_series(
        [_series("samples", "m-a", [(T0.timestamp() + 60, 6)])], 60, T0, T0 + timedelta(hours=1)
    )
    kept, owners = split_by_owner(points, None, T0, T0 + timedelta(hours=1), 60)
    assert (len(kept), [o.machine_id for o in owners]) == (1, ["m-a"])


def test_discovery_lists_services_agents_and_running_machines_with_their_labels():
    hosts = [{"_id": "h1", "dc": "dc1", "labels": {"dockvm.metrics.monitor": "10.1.0.1:9114"}}]
    machines = [
        {"_id": "m-1", "dc": "dc1", "host": "h1", "app": "shop", "ip": "10.0.0.5"},
        {"_id": "m-2", "dc": "dc1", "host": "h1", "app": "shop", "ip": None},
    ]
    groups = sd_targets(hosts, machines, services="gateway=127.0.0.1:8080",
                        agent_ports="provisioner=9103,monitor=9104", node_port=9100)
    assert groups == [
        {"targets": ["127.0.0.1:8080"], "labels": {"app": "gateway"}},
        {"targets": ["127.0.0.1:9103"], "labels": {"dc": "dc1", "host": "h1",
                                                   "app": "provisioner"}},
        {"targets": ["10.1.0.1:9114"], "labels": {"dc": "dc1", "host": "h1", "app": "monitor"}},
        {"targets": ["10.0.0.5:9100"], "labels": {"dc": "dc1", "host": "h1", "app": "shop",
                                                   "ip": "10.0.0.5", "machine_id": "m-1"}},
    ]


def test_an_ip_ipam_never_leased_keeps_its_points():
    points = points_from_series(
        [_series("samples", "m-a", [(T0.timestamp() + 60, 6)])], 60, T0, T0 + timedelta(hours=1)
    )
    kept, owners = split_by_owner(points, [], T0, T0 + timedelta(hours=1), 60)
    assert (len(kept), [o.machine_id for o in owners]) == (1, ["m-a"])


def test_the_fields_are_sent_as_four_concurrent_queries_covering_each_once():
    whole = history_promql("10.0.0.5", 60).split(" or ")
    parts = [p.split(" or ") for p in history_queries("10.0.0.5", 60)]
    assert len(parts) == 4
    assert sorted(f for p in parts for f in p) == sorted(whole)


def test_owner_cache_serves_fresh_windows_only(monkeypatch: pytest.MonkeyPatch):
    from services.gateway.api import prometheus as api

    now = [100.0]
    monkeypatch.setattr(api.time, "monotonic", lambda: now[0])
    cache = api.OwnerCache(ttl_s=10, size=2)
    windows = owner_windows([_hist("m-a", "allocated", 0)])
    cache.put("10.0.0.5", windows)
    fresh = cache.get("10.0.0.5")
    now[0] += 11
    assert (fresh, cache.get("10.0.0.5"), cache.get("10.0.0.6")) == (windows, None, None)
