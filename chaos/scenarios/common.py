"""What the scenarios share: their parameters and the destroy that ends most rounds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from chaos.checks import audit, containers, host_traces
from chaos.stack import ChaosStack


@dataclass
class Params:
    """Sizes of the scenarios (the issue's by default; ``make test`` passes smaller ones)."""

    batch: int = 10  # machines per create in the kill scenarios
    pushes: int = 20  # image pushes in the registry scenario
    dockerd_machines: int = 50
    dockerd_restarts: int = 6
    loop_workers: int = 3  # create/destroy loops under a RabbitMQ or FerretDB restart
    loop_s: float = 20.0  # how long the loops run before, and again after, the restart
    settle_s: float = 300.0  # the most a round waits for its machines to settle
    # An operation's duration without faults, measured once: kills land at random within it.
    create_s: float | None = None
    destroy_s: float | None = None
    resize_s: float | None = None


async def create_running(stack: ChaosStack, app: str, count: int) -> tuple[list[str], list[str]]:
    """Create ``count`` machines and wait; their ids and a failure per machine not running."""
    assert stack.api is not None
    ids = await stack.api.create(stack.spec(app), count)
    ms = await stack.api.settle(ids, timeout=300)
    return ids, not_in_state(ms, "running")


def not_in_state(machines: list[dict], state: str) -> list[str]:
    """A failure line for each machine not settled in ``state``."""
    return [
        f"{m['id']} ended {m['state']} (pending {m['pending']}, reason {m.get('reason')}), "
        f"not {state}"
        for m in machines
        if m["state"] != state or m["pending"] is not None
    ]


async def destroy_checked(stack: ChaosStack, ids: list[str]) -> list[str]:
    """Destroy ``ids``; failures if one is not destroyed or left a container, disk, loop or
    mount, or the run's IPs and containers no longer add up."""
    assert stack.api is not None
    await asyncio.gather(*(stack.api.delete(mid) for mid in ids))
    ms = await stack.api.settle(ids, timeout=300)
    failures = not_in_state(ms, "destroyed")
    return failures + await leftovers(stack, ids)


async def leftovers(stack: ChaosStack, destroyed: list[str]) -> list[str]:
    """Traces of ``destroyed`` on the host and engine, and the run's whole audit."""
    left = await asyncio.to_thread(containers, stack.prefix)
    failures = [f"{mid}: container left after destroy" for mid in destroyed if mid in left]
    failures += await asyncio.to_thread(host_traces, stack.agent_state, destroyed)
    return failures + await audit(stack.db_name, stack.prefix)
