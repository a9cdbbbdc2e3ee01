"""``kill -9`` of one service at a random moment of a batch create, a destroy or a resize.

The killed service is started again at once, as a supervisor would; what must hold is that the
operation in flight ends as asked (the saga resumes, a command is redelivered) and nothing is
left half-done: no orphan container, no leaked or duplicate IP, no disk of a destroyed machine.
"""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime

import docker

from chaos.checks import audit, containers
from chaos.report import Round
from chaos.scenarios.common import (
    Params,
    create_running,
    destroy_checked,
    leftovers,
    not_in_state,
)
from chaos.stack import ChaosStack

# A resize that grows every limit, so each step (cgroup, XFS grow) has work to do.
RESIZE = {"cpus": 0.1, "memory": "96m", "disk": "768m"}
RESIZED = {"cpus": 0.1, "memory": 96 << 20, "disk": 768 << 20}


async def _calibrate(stack: ChaosStack, p: Params) -> None:
    """Time one create of ``p.batch`` machines without a fault: kills land within it."""
    t0 = time.monotonic()
    ids, failures = await create_running(stack, "calibrate", p.batch)
    p.create_s = time.monotonic() - t0
    failures += await destroy_checked(stack, ids)
    if failures:
        raise RuntimeError(f"a create without faults failed: {failures[:3]}")


async def _last_reached(stack: ChaosStack, ids: list[str], state: str) -> datetime | None:
    """When the last of ``ids`` last reached ``state`` (from their transitions)."""
    assert stack.api is not None
    last = None
    for mid in ids:
        _, m = await stack.api.call("GET", f"/v1/machines/{mid}")
        for t in m.get("transitions", []):
            at = datetime.fromisoformat(t["at"])
            if t["state"] == state and (last is None or at > last):
                last = at
    return last


async def _landed(stack: ChaosStack, ids: list[str], state: str, at: datetime, op: str) -> str:
    """Whether the kill at ``at`` fell before the operation ended (the last ``state`` reached)."""
    last = await _last_reached(stack, ids, state)
    return f"killed mid-{op}" if last is None or at < last else f"killed after the {op}"


async def kill_during_create(stack: ChaosStack, p: Params, rnd: int, *, service: str) -> Round:
    """A create of ``p.batch`` machines, ``service`` killed at a random moment of it."""
    assert stack.api is not None
    if p.create_s is None:
        await _calibrate(stack, p)
    assert p.create_s is not None
    t0 = time.monotonic()
    ids = await stack.api.create(stack.spec(f"k{service[:4]}{rnd}"), p.batch)
    delay = random.uniform(0.0, p.create_s)
    await asyncio.sleep(delay)
    t_kill, at = time.monotonic(), datetime.now(UTC)
    await stack.kill9(service)
    back = time.monotonic() - t_kill
    ms = await stack.api.settle(ids, timeout=p.settle_s)
    took = time.monotonic() - t0
    note = await _landed(stack, ids, "running", at, "create")
    failures = not_in_state(ms, "running") + await audit(stack.db_name, stack.prefix)
    failures += await destroy_checked(stack, ids)
    return Round(failures, {"killed at": delay, "restart": back, "create": took}, note=note)


async def _time_destroy(stack: ChaosStack) -> float:
    """Seconds a destroy of three machines takes without a fault (kills land within it)."""
    assert stack.api is not None
    ids, failures = await create_running(stack, "calibrate", 3)
    t0 = time.monotonic()
    failures += await destroy_checked(stack, ids)
    if failures:
        raise RuntimeError(f"a destroy without faults failed: {failures[:3]}")
    return time.monotonic() - t0


async def _time_resize(stack: ChaosStack) -> float:
    """Seconds a resize of two machines takes without a fault (kills land within it)."""
    assert stack.api is not None
    ids, failures = await create_running(stack, "calibrate", 2)
    t0 = time.monotonic()
    await asyncio.gather(
        *(stack.api.call("PATCH", f"/v1/machines/{mid}", json=RESIZE) for mid in ids)
    )
    failures += not_in_state(await stack.api.settle(ids), "running")
    took = time.monotonic() - t0
    failures += await destroy_checked(stack, ids)
    if failures:
        raise RuntimeError(f"a resize without faults failed: {failures[:3]}")
    return took


async def kill_during_destroy(stack: ChaosStack, p: Params, rnd: int) -> Round:
    """Three running machines destroyed at once, the provisioner killed in the middle."""
    assert stack.api is not None
    ids, failures = await create_running(stack, f"kd{rnd}", 3)
    t0 = time.monotonic()
    deletes = asyncio.gather(*(stack.api.delete(mid) for mid in ids))
    if p.destroy_s is None:
        p.destroy_s = await _time_destroy(stack)
    delay = random.uniform(0.0, p.destroy_s)
    await asyncio.sleep(delay)
    at = datetime.now(UTC)
    await stack.kill9("provisioner")
    await deletes
    ms = await stack.api.settle(ids, timeout=p.settle_s)
    took = time.monotonic() - t0
    failures += not_in_state(ms, "destroyed") + await leftovers(stack, ids)
    # Whatever did not end destroyed is destroyed again (not counted twice), for the next round.
    rest = [m["id"] for m in ms if m["state"] != "destroyed"]
    if rest:
        await destroy_checked(stack, rest)
    note = await _landed(stack, ids, "destroyed", at, "destroy")
    return Round(failures, {"killed at": delay, "destroy": took}, note=note)


def _limits(container_id: str) -> tuple[float, int]:
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=60)
    try:
        hc = client.api.inspect_container(container_id)["HostConfig"]
    finally:
        client.close()
    cpus = hc["NanoCpus"] / 1e9 or hc["CpuQuota"] / (hc["CpuPeriod"] or 100_000)
    return round(cpus, 3), hc["Memory"]


async def kill_during_resize(stack: ChaosStack, p: Params, rnd: int) -> Round:
    """Two running machines resized (CPU, memory, disk), the provisioner killed in the middle."""
    assert stack.api is not None
    ids, failures = await create_running(stack, f"kr{rnd}", 2)
    t0 = time.monotonic()
    patches = asyncio.gather(
        *(stack.api.call("PATCH", f"/v1/machines/{mid}", json=RESIZE) for mid in ids)
    )
    if p.resize_s is None:
        p.resize_s = await _time_resize(stack)
    delay = random.uniform(0.0, p.resize_s)
    await asyncio.sleep(delay)
    at = datetime.now(UTC)
    await stack.kill9("provisioner")
    answers = await patches
    ms = await stack.api.settle(ids, timeout=p.settle_s)
    took = time.monotonic() - t0
    failures += [f"PATCH answered {s}: {b}" for s, b in answers if s not in (200, 202)]
    failures += not_in_state(ms, "running")
    failures += [
        f"{m['id']}: {k} is {m[k]}, not {v}" for m in ms for k, v in RESIZED.items() if m[k] != v
    ]
    found = await asyncio.to_thread(containers, stack.prefix)
    for mid in ids:
        if mid in found:
            cpus, memory = await asyncio.to_thread(_limits, found[mid].id)
            if (cpus, memory) != (RESIZED["cpus"], RESIZED["memory"]):
                failures.append(f"{mid}: the container has {cpus} CPU, {memory} B memory")
    note = await _landed(stack, ids, "running", at, "resize")
    failures += await destroy_checked(stack, ids)
    return Round(failures, {"killed at": delay, "resize": took}, note=note)
