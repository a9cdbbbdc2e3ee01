"""The Docker side of the monitor: the labelled containers (list + inspect) and the events stream.

The events stream is a blocking generator of the docker SDK; it runs in its own executor thread
and each event is handed to the event loop with ``call_soon_threadsafe``. When the stream
breaks (dockerd restarted, the socket was cut) the thread reconnects with backoff and asks for
events ``since`` the last one it saw, so nothing in dockerd's buffer is lost; a
:class:`Connected` marker follows each (re)connection so the caller can resync what dockerd no
longer remembers. Duplicates of the replay are the caller's to drop (by ``(id, timeNano,
action)``, see ``domain.LifecycleTracker``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import docker
import structlog

from libs.common.errors import translate_errors

from ..domain import LABEL_MACHINE, ContainerMeta, Observed

__all__ = [
    "Connected",
    "Disconnected",
    "DockerEngine",
    "DockerEvents",
    "parse_docker_time",
]

log = structlog.get_logger("monitor.docker")
_NS = 1_000_000_000


def parse_docker_time(value: str | None) -> int:
    """``2026-11-27T01:02:03.123456789Z`` → ns since the epoch (Docker's zero time → 0)."""
    if not value or value.startswith("0001-"):
        return 0
    value = value.rstrip("Z")
    whole, _, frac = value.partition(".")
    offset = 0
    if "+" in frac or "-" in frac:  # a numeric zone offset after the fraction
        sep = "+" if "+" in frac else "-"
        frac, _, zone = frac.partition(sep)
        hh, _, mm = zone.partition(":")
        offset = (int(hh) * 3600 + int(mm or 0) * 60) * (1 if sep == "+" else -1)
    secs = int(datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp())
    return (secs - offset) * _NS + int((frac or "0").ljust(9, "0")[:9])


def label_filters(extra: str | None) -> list[str]:
    """The Docker label filters for dockvm containers, plus an optional ``k=v`` selector."""
    return [LABEL_MACHINE, *([extra] if extra else [])]


@dataclass(frozen=True, slots=True)
class Connected:
    """The events stream is (re)connected; events after it are live or replayed."""

    reconnect: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The events stream broke; the reader is reconnecting."""

    error: str


class DockerEngine:
    """List and inspect the dockvm containers of this host, off the event loop."""

    def __init__(
        self, url: str, *, workers: int = 4, label: str | None = None, timeout: float = 30.0
    ) -> None:
        self._url = url
        self._timeout = timeout
        self._labels = label_filters(label)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="monitor-docker")
        self._client: docker.APIClient | None = None
        self._cache: dict[str, Observed] = {}

    @property
    def _api(self) -> docker.APIClient:
        # Made on first use, in a worker thread: version negotiation is a blocking call.
        if self._client is None:
            self._client = docker.APIClient(
                base_url=self._url, timeout=self._timeout, version="auto"
            )
        return self._client

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @translate_errors
    def _observe_sync(self, full: bool) -> list[Observed]:
        out = []
        cache: dict[str, Observed] = {}
        for c in self._api.containers(all=True, filters={"label": self._labels}):
            known = self._cache.get(c["Id"])
            # A cheap pass trusts what it inspected before while the listed state agrees.
            if not full and known is not None and known.running == (c.get("State") == "running"):
                o: Observed | None = known
            else:
                o = self._inspect_sync(c["Id"])
            if o is not None:
                out.append(o)
                cache[o.meta.container_id] = o
        self._cache = cache
        return out

    def _inspect_sync(self, container_id: str) -> Observed | None:
        try:
            info = self._api.inspect_container(container_id)
        except docker.errors.NotFound:
            return None
        meta = ContainerMeta.from_labels(info["Id"], info["Config"].get("Labels") or {})
        if meta is None:
            return None
        st = info["State"]
        return Observed(
            meta=meta,
            running=bool(st.get("Running")),
            started_ns=parse_docker_time(st.get("StartedAt")),
            finished_ns=parse_docker_time(st.get("FinishedAt")),
            exit_code=st.get("ExitCode"),
            oom_killed=bool(st.get("OOMKilled")),
            pid=st.get("Pid") or None,
        )

    async def observe(self, full: bool = True) -> list[Observed]:
        """Every dockvm container on the host (running or not) as the API sees it now.

        ``full=False`` inspects only the containers whose listed state changed since the
        last pass: one API call per resync on a quiet host."""
        return await self._run(self._observe_sync, full)

    async def inspect(self, container_id: str) -> Observed | None:
        """One container, or None when it is gone or not a dockvm container."""
        return await self._run(translate_errors(self._inspect_sync), container_id)

    async def ping(self) -> None:
        """Raise unless dockerd answers."""
        await self._run(translate_errors(lambda: self._api.ping()))

    def close(self) -> None:
        """Release the client and the threads."""
        if self._client is not None:
            self._client.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


class DockerEvents:
    """The container events of dockvm containers, forever, across dockerd restarts."""

    def __init__(
        self,
        url: str,
        *,
        label: str | None = None,
        backoff_s: float = 0.2,
        backoff_cap_s: float = 5.0,
    ) -> None:
        self._url = url
        self._labels = label_filters(label)
        self._backoff = (backoff_s, backoff_cap_s)
        self._stop = threading.Event()
        self._stream: Any = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="monitor-events")
        self.last_ns = 0

    def _since(self) -> str | None:
        if not self.last_ns:
            return None
        return f"{self.last_ns // _NS}.{self.last_ns % _NS:09d}"

    def _pump(self, put: Callable[[object], None]) -> None:
        delay, cap = self._backoff
        first = True
        while not self._stop.is_set():
            error = "stream ended"
            api = None
            try:
                api = docker.APIClient(base_url=self._url, timeout=10, version="auto")
                stream = api.events(
                    since=self._since(),
                    filters={"type": ["container"], "label": self._labels},
                    decode=True,
                )
                self._stream = stream
                put(Connected(reconnect=not first))
                first, delay = False, self._backoff[0]
                for event in stream:
                    if isinstance(event, Mapping):
                        self.last_ns = max(self.last_ns, int(event.get("timeNano") or 0))
                        put(dict(event))
            except Exception as err:
                error = f"{err.__class__.__name__}: {err}"
            finally:
                self._stream = None
                if api is not None:
                    api.close()
            if self._stop.is_set():
                break
            put(Disconnected(error))
            self._stop.wait(delay)
            delay = min(delay * 2, cap)

    async def stream(
        self, since_ns: int = 0
    ) -> AsyncIterator[Mapping[str, Any] | Connected | Disconnected]:
        """Yield events (decoded dicts) and connection markers until :meth:`close`."""
        if since_ns:
            self.last_ns = since_ns
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        pump = loop.run_in_executor(self._pool, self._pump, put)
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, pump}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    pump.result()  # the thread only ends on close(); surface its error
                    return
                yield getter.result()  # type: ignore[misc]
        finally:
            self.close()

    def close(self) -> None:
        """Stop the reader thread (closing the open stream wakes it)."""
        self._stop.set()
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception as err:  # already broken: the thread exits anyway
                log.debug("closing events stream failed", error=repr(err))
        self._pool.shutdown(wait=False)
