"""Lifecycle events from the real Docker events stream: OOM, restart loops, and a cut stream.

The monitor's service runs with the real Docker adapters; the bus and the database are the
in-memory fakes here (the service test covers them), since what is under test is Docker.

A dockerd restart is not done here: the engine is shared with other engineers' tests and
live-restore is off, so a restart would kill their containers. The same code path (the stream
breaks, the reader reconnects with ``since``, a resync fills what dockerd forgot) is driven by
a TCP proxy in front of the Docker socket that the test cuts and restores.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from libs.common.bus import MemoryPublisher
from libs.common.contracts.monitor import (
    ContainerDied,
    ContainerFlapping,
    ContainerHealth,
    ContainerOomKilled,
    ContainerRestarted,
    ContainerStarted,
)
from services.monitor.adapters import (
    DockerEngine,
    DockerEvents,
    host_cpus,
    host_memory,
    make_reader,
    read_net,
)
from services.monitor.domain import LifecycleTracker
from services.monitor.exporter import ContainerCollector
from services.monitor.fakes import MemoryMonitorStore
from services.monitor.sampler import Sampler
from services.monitor.service import MonitorService

from .test_monitor_support import Sandbox, sandbox  # noqa: F401

DOCKER_SOCK = "/var/run/docker.sock"


class DockerProxy:
    """A TCP front for the Docker socket that can be cut (every connection dropped) and restored."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(DOCKER_SOCK)
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def start(self) -> DockerProxy:
        """Listen (again) on the same port."""
        self._server = await asyncio.start_server(
            self._client, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        """Stop listening and drop every open connection, as a dying dockerd does."""
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        """The Docker URL of the proxy."""
        return f"tcp://127.0.0.1:{self.port}"


def _monitor(
    url: str, box: Sandbox, store: MemoryMonitorStore | None = None
) -> tuple[MonitorService, MemoryPublisher, DockerEvents, DockerEngine]:
    engine = DockerEngine(url, label=box.selector)
    events = DockerEvents(url, label=box.selector, backoff_cap_s=0.5)
    pub = MemoryPublisher("monitor")
    mon = MonitorService(
        host="it", containers=engine, events=events,
        sampler=Sampler(make_reader(), read_net, host_cpus=host_cpus(),
                        host_memory=host_memory()),
        store=store or MemoryMonitorStore(), publisher=pub, tracker=LifecycleTracker("it"),
        collector=ContainerCollector("it"), interval_s=1,
    )
    return mon, pub, events, engine


@contextlib.asynccontextmanager
async def _running(
    url: str, box: Sandbox, store: MemoryMonitorStore | None = None
) -> AsyncIterator[tuple[MonitorService, MemoryPublisher]]:
    mon, pub, events, engine = _monitor(url, box, store)
    since = await mon.start()
    task = asyncio.create_task(mon.follow_events(since))
    try:
        await _until(lambda: mon.connected, "the events stream")
        yield mon, pub
    finally:
        events.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        mon.close()
        engine.close()


async def _until(predicate, what: str, timeout: float = 45.0):
    async with asyncio.timeout(timeout):
        while not (value := predicate()):
            await asyncio.sleep(0.1)
    return value


def _of(pub: MemoryPublisher, cls: type, machine: str) -> list:
    return [m for m in pub.of_type(cls.TYPE) if m.machine_id == machine]


async def test_a_container_exceeding_its_memory_gives_an_oom_event(sandbox: Sandbox):  # noqa: F811
    async with _running(f"unix://{DOCKER_SOCK}", sandbox) as (_, pub):
        _, machine, _ = await asyncio.to_thread(
            sandbox.run_container, "oom", ["python3", "-c", "b = b'x' * (256 << 20)"],
            memory="64m",
        )
        await _until(lambda: _of(pub, ContainerDied, machine), "the container to die")
    (oom,) = _of(pub, ContainerOomKilled, machine)
    (died,) = _of(pub, ContainerDied, machine)
    assert (died.oom_killed, died.exit_code, oom.container_id) == (True, 137, died.container_id)


async def test_a_restart_loop_is_flapping(sandbox: Sandbox):  # noqa: F811
    async with _running(f"unix://{DOCKER_SOCK}", sandbox) as (_, pub):
        _, machine, _ = await asyncio.to_thread(
            sandbox.run_container, "flap", ["sh", "-c", "sleep 0.3; exit 3"],
            restart_policy={"Name": "always"},
        )
        (flap,) = await _until(lambda: _of(pub, ContainerFlapping, machine), "flapping")
    assert (flap.restarts, flap.threshold, flap.window_s) == (3, 3, 300)
    assert [d.exit_code for d in _of(pub, ContainerDied, machine)][:3] == [3, 3, 3]


async def test_a_cut_events_stream_resumes_with_no_gap_and_no_duplicate(
    sandbox: Sandbox,  # noqa: F811
):
    proxy = await DockerProxy().start()
    async with _running(proxy.url, sandbox) as (mon, pub):
        a, machine_a, _ = await asyncio.to_thread(sandbox.run_container, "a",
                                                  ["sleep", "infinity"])
        await _until(lambda: _of(pub, ContainerStarted, machine_a), "a to start")
        await _until(lambda: a.id in mon.targets, "a to be sampled")

        await proxy.cut()
        await _until(lambda: not mon.connected, "the stream to break")
        during_cut = await mon.sample_round()
        await asyncio.to_thread(a.stop, timeout=0)
        b, machine_b, _ = await asyncio.to_thread(sandbox.run_container, "b",
                                                  ["sleep", "infinity"])
        await proxy.start()

        await _until(lambda: _of(pub, ContainerStarted, machine_b), "b's start after the cut")
        await _until(lambda: _of(pub, ContainerDied, machine_a), "a's death after the cut")
        await _until(lambda: b.id in mon.targets, "b to be sampled")
        after = await mon.sample_round()
        # the replay of dockerd's buffer may still be arriving: give duplicates a chance
        await asyncio.sleep(2)
    assert [s.container_id for s in during_cut] == [a.id]
    assert [s.container_id for s in after] == [b.id]
    assert len(_of(pub, ContainerStarted, machine_a)) == 1
    assert len(_of(pub, ContainerDied, machine_a)) == 1
    assert len(_of(pub, ContainerStarted, machine_b)) == 1




async def test_docker_restart_and_health_become_restarted_and_health_events(
    sandbox: Sandbox,  # noqa: F811
):
    async with _running(f"unix://{DOCKER_SOCK}", sandbox) as (_, pub):
        container, machine, _ = await asyncio.to_thread(
            sandbox.run_container, "health", ["sleep", "infinity"],
            healthcheck={"test": ["CMD", "true"], "interval": 500_000_000,
                         "start_period": 0, "retries": 1},
        )
        (health,) = await _until(lambda: _of(pub, ContainerHealth, machine), "healthy")
        await asyncio.to_thread(container.restart, timeout=0)
        (restarted,) = await _until(lambda: _of(pub, ContainerRestarted, machine), "restart")
    assert health.status == "healthy"
    assert restarted.restarts_in_window == 1
    assert len(_of(pub, ContainerStarted, machine)) == 2
    (died,) = _of(pub, ContainerDied, machine)
    assert died.exit_code in (137, 143)  # SIGKILL, or SIGTERM forwarded by tini first


async def test_a_restarted_monitor_publishes_what_happened_while_it_was_down_once(
    sandbox: Sandbox,  # noqa: F811
):
    store = MemoryMonitorStore()  # what the monitor keeps in MongoDB across its restarts
    async with _running(f"unix://{DOCKER_SOCK}", sandbox, store) as (_, first):
        a, machine_a, _ = await asyncio.to_thread(sandbox.run_container, "a",
                                                  ["sleep", "infinity"])
        await _until(lambda: _of(first, ContainerStarted, machine_a), "a to start")
    await asyncio.to_thread(a.stop, timeout=0)
    b, machine_b, _ = await asyncio.to_thread(sandbox.run_container, "b", ["sleep", "infinity"])
    async with _running(f"unix://{DOCKER_SOCK}", sandbox, store) as (mon, second):
        await _until(lambda: b.id in mon.targets, "b to be sampled")
        await asyncio.sleep(2)  # dockerd's replay of a's death and b's start arrives meanwhile
    assert len(_of(second, ContainerDied, machine_a)) == 1
    assert len(_of(second, ContainerStarted, machine_b)) == 1
    assert _of(second, ContainerStarted, machine_a) == []
