"""Restarts of shared infrastructure under load: RabbitMQ or FerretDB under a create/destroy
loop, and dockerd restarted several times under many machines.

These disturb everything else on the machine; the scenario table marks them disruptive.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import docker

from chaos import faults
from chaos.checks import audit, containers, doubled
from chaos.report import Round
from chaos.scenarios.common import Params, create_running, destroy_checked, not_in_state
from chaos.stack import ChaosStack


async def _cycles(stack: ChaosStack, app: str, stop: asyncio.Event, ids: list[str]) -> list[str]:
    """Create one machine, wait for it, destroy it, wait; until ``stop``. Failures seen."""
    assert stack.api is not None
    failures: list[str] = []
    while not stop.is_set():
        [mid] = await stack.api.create(stack.spec(app), 1)
        ids.append(mid)
        # A machine that does not settle in 2 minutes is reported; the loop goes on.
        [m] = await stack.api.settle([mid], timeout=120)
        failures += not_in_state([m], "running")
        await stack.api.delete(mid)
        [m] = await stack.api.settle([mid], timeout=120)
        failures += not_in_state([m], "destroyed")
    return failures


async def _services_ready(stack: ChaosStack, timeout: float = 180.0) -> float:
    """Seconds until every service's /readyz answers 200 again."""
    t0 = time.monotonic()
    for svc in stack.services.values():
        await svc.wait_ready(timeout)
    return time.monotonic() - t0


async def loop_under(
    stack: ChaosStack, p: Params, rnd: int, restart: Callable[[], Awaitable[float]]
) -> Round:
    """``p.loop_workers`` create/destroy loops; ``restart`` after ``p.loop_s``; the loops go
    on ``p.loop_s`` more; then every command must have taken effect, once."""
    assert stack.vhost is not None
    stop, ids = asyncio.Event(), []
    loops = [
        asyncio.create_task(_cycles(stack, f"l{rnd}w{w}", stop, ids)) for w in range(p.loop_workers)
    ]
    await asyncio.sleep(p.loop_s)
    queues = await faults.consumed_queues(stack.vhost.name)
    away = await restart()
    back = await faults.wait_consumers(stack.vhost.name, queues)
    ready = await _services_ready(stack)
    await asyncio.sleep(p.loop_s)
    stop.set()
    results = await asyncio.gather(*loops, return_exceptions=True)
    failures = [f"a loop died: {r!r}" for r in results if isinstance(r, BaseException)]
    failures += [line for r in results if isinstance(r, list) for line in r]
    ms = await stack.api.settle(ids, timeout=180)  # type: ignore[union-attr]
    failures += not_in_state(ms, "destroyed")  # a command lost leaves a machine behind
    failures += await doubled(stack.db_name, ids)
    failures += await audit(stack.db_name, stack.prefix)
    if back > 30:
        failures.append(f"consumers back after {back:.0f}s (> 30s)")
    timings = {"away": away, "consumers back": back, "ready": ready}
    return Round(failures, timings, note=f"{len(ids)} machines created and destroyed")


async def rabbitmq_restart(stack: ChaosStack, p: Params, rnd: int) -> Round:
    """The loops under a RabbitMQ restart."""
    return await loop_under(stack, p, rnd, faults.restart_rabbitmq)


async def ferretdb_restart(stack: ChaosStack, p: Params, rnd: int) -> Round:
    """The loops under a FerretDB restart."""
    return await loop_under(stack, p, rnd, faults.restart_ferretdb)


def _host_keys(ids: list[str], found: dict) -> dict[str, str]:
    """Each running machine's ed25519 host key, read inside its container (eight at a time:
    one by one, 50 reads after a restart took minutes on a loaded host)."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=60)

    def read(mid: str) -> tuple[str, str | None]:
        c = found.get(mid)
        if c is None or c.state != "running":
            return mid, None
        try:
            ex = client.api.exec_create(c.id, ["cat", "/etc/ssh/ssh_host_ed25519_key.pub"])
            out = client.api.exec_start(ex["Id"]).decode().strip()
            code = client.api.exec_inspect(ex["Id"])["ExitCode"]
        except docker.errors.APIError:
            return mid, None  # not running after all: counted as a mismatch
        # Not yet written (sshd's first boot makes it): cat's error is not a key.
        return mid, out if code == 0 and out.startswith("ssh-ed25519 ") else None

    try:
        with ThreadPoolExecutor(8) as pool:
            return {mid: key for mid, key in pool.map(read, ids) if key is not None}
    finally:
        client.close()


async def _snapshot(stack: ChaosStack, ids: list[str], keys: bool = True) -> dict[str, tuple]:
    """Per machine: the gateway's state and IP, the container's state and IP, the host key
    (read inside each container, so only when ``keys``)."""
    assert stack.api is not None
    ms = {m["id"]: m for m in await stack.api.machines(ids)}
    found = await asyncio.to_thread(containers, stack.prefix)
    host_keys = await asyncio.to_thread(_host_keys, ids, found) if keys else {}
    out = {}
    for mid in ids:
        c = found.get(mid)
        m = ms.get(mid, {})
        out[mid] = (m.get("state"), m.get("ip"), c and c.state, c and c.ip, host_keys.get(mid))
    return out


def _diff(want: dict, now: dict, keys: bool) -> list[str]:
    n = None if keys else -1  # without keys, the key column is not compared
    return [
        f"{mid}: {now.get(mid)} != {w}"
        for mid, w in want.items()
        if (now.get(mid) or ())[:n] != w[:n]
    ]


async def _matches(stack: ChaosStack, ids: list[str], want: dict, timeout: float) -> list[str]:
    """Wait until every machine is as in ``want`` (states and IPs first, then the host keys);
    the mismatches left at ``timeout``. Prints how long the states and each key read took."""
    diff: list[str] = []
    t0 = time.monotonic()
    states_at: float | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    diff = _diff(want, await _snapshot(stack, ids, keys=False), keys=False)
                    if not diff:
                        if states_at is None:
                            states_at = time.monotonic() - t0
                            print(f"chaos:     states and IPs match after {states_at:.1f}s",
                                  flush=True)  # fmt: skip
                        # A timeout during the key read must not read as a match.
                        diff = ["states and IPs match, host keys not compared yet"]
                        k0 = time.monotonic()
                        diff = _diff(want, await _snapshot(stack, ids), keys=True)
                        print(f"chaos:     host keys read in {time.monotonic() - k0:.1f}s, "
                              f"{len(diff)} differ", flush=True)  # fmt: skip
                except (aiohttp.ClientError, docker.errors.DockerException, OSError) as err:
                    diff = [f"the engine or the gateway did not answer: {err!r}"]
                if not diff:
                    return []
                await asyncio.sleep(2)
    except TimeoutError:
        return diff


async def dockerd_restart(stack: ChaosStack, p: Params, rnd: int) -> Round:
    """``p.dockerd_machines`` machines, dockerd restarted ``p.dockerd_restarts`` times: each
    time every machine comes back running with its IP and host key within 5 minutes."""
    ids: list[str] = []
    failures: list[str] = []
    for start in range(0, p.dockerd_machines, 50):
        more, bad = await create_running(stack, f"d{rnd}", min(50, p.dockerd_machines - start))
        ids, failures = ids + more, failures + bad
    # What each machine must come back as; read again until every one has its host key
    # (a machine's sshd writes it at first boot, which may still run as the create returns).
    want = await _snapshot(stack, ids)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(120):
            while any(None in w for w in want.values()):
                await asyncio.sleep(2)
                want = await _snapshot(stack, ids)
    failures += [f"{mid}: before any restart {w}" for mid, w in want.items() if None in w]
    aways, backs = [], []
    for i in range(p.dockerd_restarts):
        aways.append(await faults.restart_dockerd())
        t0 = time.monotonic()
        diff = await _matches(stack, ids, want, timeout=300)
        backs.append(time.monotonic() - t0)
        failures += [f"restart {i + 1}: {line}" for line in diff]
        print(
            f"chaos:   dockerd restart {i + 1}: away {aways[-1]:.1f}s, state matches after "
            f"{backs[-1]:.1f}s, {len(diff)} mismatch(es)",
            flush=True,
        )
        for line in diff[:5]:  # as they happen: a round cut short still shows them
            print(f"chaos:     {line}", flush=True)
    timings = (
        {
            "away": statistics.median(aways),
            "state matches": statistics.median(backs),
            "state matches (worst)": max(backs),
        }
        if backs
        else {}
    )
    failures += await audit(stack.db_name, stack.prefix)
    failures += await destroy_checked(stack, ids)
    note = f"{len(ids)} machines, {p.dockerd_restarts} restarts"
    return Round(failures, timings, note=note)
