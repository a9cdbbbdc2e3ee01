"""Lifecycle events of one machine applied in the order they happened, not in the order they
are handled: after a resync the monitor sends a die and the start that followed it a few
milliseconds apart, and the gateway handles them concurrently."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from libs.common.contracts.monitor import ContainerDied, ContainerStarted
from services.gateway.handlers import MACHINE_EVENTS
from tests.unit.test_gateway_sagas import (  # noqa: F401 (fixtures)
    _allocated,
    clock,
    driver,
    pub,
    store,
)
from tests.unit.test_gateway_sagas import _create as _gateway_create

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _died(mid: str, at: datetime, code: int = 143) -> ContainerDied:
    return ContainerDied(machine_id=mid, container_id="c", host="h1", at=at, exit_code=code)


def _started(mid: str, at: datetime) -> ContainerStarted:
    return ContainerStarted(machine_id=mid, container_id="c", host="h1", at=at)


async def _running(driver) -> str:  # noqa: F811
    [mid] = await _gateway_create(driver)
    await driver.creates.on_ip_allocated(_allocated(mid))
    await driver.creates.on_created(mid, "h1", "c1")
    return mid


async def _handle(driver, msg) -> None:  # noqa: F811
    await MACHINE_EVENTS[type(msg)](driver, msg, None)


@pytest.mark.parametrize(
    ("order", "state"),
    [
        (["died", "started"], "running"),  # as they happened
        (["started", "died"], "running"),  # the die handled last: older, dropped
        (["started"], "running"),
        (["died"], "stopped"),
    ],
)
async def test_a_die_and_the_start_after_it_end_running_in_either_order(
    driver, store, order, state  # noqa: F811
):
    mid = await _running(driver)
    events = {"died": _died(mid, T0), "started": _started(mid, T0 + timedelta(seconds=30))}

    for name in order:
        await _handle(driver, events[name])
    doc = await store.get(mid)

    assert doc["state"] == state


async def test_a_stop_after_a_start_still_stops(driver, store):  # noqa: F811
    mid = await _running(driver)

    await _handle(driver, _died(mid, T0))
    await _handle(driver, _started(mid, T0 + timedelta(seconds=1)))
    await _handle(driver, _died(mid, T0 + timedelta(seconds=2), code=0))
    doc = await store.get(mid)

    assert (doc["state"], doc["reason"]) == ("stopped", "died (exit 0)")
    assert doc["lifecycle_at"] == T0 + timedelta(seconds=2)
