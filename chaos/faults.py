"""Restarts of RabbitMQ, FerretDB and dockerd under the suite.

RabbitMQ and FerretDB are the suite's own pair (:mod:`chaos.infra`) unless ``--shared-infra``;
dockerd is always the shared engine, which disturbs everything on this machine (a running
``make run``, other test runs), so only the scenarios marked disruptive call these, and
``make test`` never does. Each returns how long the
component was away, in seconds. A restart is done the way an operator would: RabbitMQ's
application is stopped and started in its node (every connection drops, every queue restarts);
FerretDB and dockerd get SIGTERM and are started again by ``scripts/stack.sh up``.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from urllib.parse import quote

import aiohttp

from tests.support.stack import RABBIT_API, RABBIT_HEADERS

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("DOCKVM_STATE_DIR", "/var/lib/dockvm"))
NODE = os.environ.get("DOCKVM_RABBITMQ_NODENAME", "rabbit")
# Set by chaos.infra.enter: the state dir of the suite's own FerretDB (None: the shared one).
_infra = os.environ.get("DOCKVM_CHAOS_INFRA_STATE")
INFRA_STATE = Path(_infra) if _infra else None


async def _run(*argv: str, timeout: float = 180.0, env: dict[str, str] | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {out.decode()[-500:]}")


async def _wait_gone(pid: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        # Another process's exit has no event to wait on: poll.
        while Path(f"/proc/{pid}").exists():  # noqa: ASYNC110
            await asyncio.sleep(0.2)


def _pid(path: Path) -> int:
    return int(path.read_text().split()[0])


async def _sigterm_and_up(pid: int, grace: float) -> float:
    """SIGTERM ``pid``, wait until it is gone, start what is missing; the seconds it took."""
    t0 = time.monotonic()
    os.kill(pid, 15)
    await _wait_gone(pid, grace)
    await _run(str(ROOT / "scripts" / "stack.sh"), "up")
    return time.monotonic() - t0


async def restart_rabbitmq() -> float:
    """``rabbitmqctl stop_app`` then ``start_app``; the seconds the broker was away."""
    t0 = time.monotonic()
    await _run("rabbitmqctl", "-n", NODE, "stop_app")
    await _run("rabbitmqctl", "-n", NODE, "start_app")
    return time.monotonic() - t0


async def restart_ferretdb() -> float:
    """SIGTERM FerretDB (the stack's pid file) and start it again: the chaos suite's own
    (:mod:`chaos.infra`) unless it runs on the shared stack."""
    if INFRA_STATE is None:
        return await _sigterm_and_up(_pid(STATE / "run" / "ferretdb.pid"), 30)
    from chaos.infra import stack_env

    t0 = time.monotonic()
    pid = _pid(INFRA_STATE / "run" / "ferretdb.pid")
    os.kill(pid, 15)
    await _wait_gone(pid, 30)
    await _run(str(ROOT / "scripts" / "stack.sh"), "infra-up", env=stack_env())
    return time.monotonic() - t0


async def restart_dockerd() -> float:
    """SIGTERM dockerd (it stops its containers first) and start it again."""
    return await _sigterm_and_up(_pid(Path("/var/run/docker.pid")), 120)


async def consumed_queues(vhost: str) -> set[str]:
    """The durable queues of ``vhost`` that have at least one consumer now (an exclusive queue
    gets a new name when its owner reconnects, so it is not followed)."""
    url = f"{RABBIT_API}/queues/{quote(vhost, safe='')}?columns=name,consumers,exclusive"
    try:
        async with aiohttp.ClientSession(headers=RABBIT_HEADERS) as s, s.get(url) as r:
            if r.status != 200:
                return set()
            return {
                q["name"]
                for q in await r.json()
                if q.get("consumers") and not q.get("exclusive") and not q["name"].startswith("amq")
            }
    except aiohttp.ClientError:
        return set()


async def wait_consumers(vhost: str, queues: set[str], timeout: float = 120.0) -> float:
    """Seconds until every queue of ``queues`` has a consumer again (inf past ``timeout``)."""
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while not queues <= await consumed_queues(vhost):  # noqa: ASYNC110 (polls an API)
                await asyncio.sleep(0.5)
    except TimeoutError:
        return float("inf")
    return time.monotonic() - t0
