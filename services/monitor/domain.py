"""Pure logic of the monitor: the math of samples, lifecycle tracking, flapping.

Nothing here does I/O: the adapters read cgroup files, ``/proc/<pid>/net/dev`` and the Docker
events stream, and hand plain values to these functions.
"""

from __future__ import annotations

import functools
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from typing import Any

from libs.common.contracts.envelope import Message
from libs.common.contracts.monitor import (
    ContainerDied,
    ContainerFlapping,
    ContainerHealth,
    ContainerOomKilled,
    ContainerRestarted,
    ContainerSample,
    ContainerStarted,
)

__all__ = [
    "LABEL_APP",
    "LABEL_IP",
    "LABEL_MACHINE",
    "CgroupStats",
    "ContainerMeta",
    "LifecycleTracker",
    "NetStats",
    "Observed",
    "Reading",
    "build_sample",
    "counter_delta",
    "cpu_percent",
    "effective_limit",
    "event_id",
    "working_set",
]

LABEL_MACHINE = "dockvm.machine_id"
LABEL_IP = "dockvm.ip"
LABEL_APP = "dockvm.app"

# The v1 kernel reports "no limit" as the largest page-aligned int64; anything above 2^60 is it.
_NO_LIMIT = 1 << 60
_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class ContainerMeta:
    """Who a container is, from its labels."""

    container_id: str
    machine_id: str
    ip: str | None
    app: str | None

    @classmethod
    def from_labels(cls, container_id: str, labels: Mapping[str, str]) -> ContainerMeta | None:
        """The meta of a dockvm container, or None when it lacks the machine label."""
        machine = labels.get(LABEL_MACHINE)
        if not machine:
            return None
        return cls(container_id, machine, labels.get(LABEL_IP) or None, labels.get(LABEL_APP))


@dataclass(frozen=True, slots=True)
class CgroupStats:
    """The raw counters and gauges of one container's cgroup (v1 or v2, normalised)."""

    cpu_usage_ns: int
    nr_periods: int
    nr_throttled: int
    throttled_ns: int
    quota_cpus: float | None  # None: no CFS quota
    mem_usage: int
    mem_limit: int | None  # None: unlimited
    mem_rss: int
    mem_cache: int
    mem_inactive_file: int
    oom_kills: int
    blk_read_bytes: int
    blk_write_bytes: int
    blk_read_ops: int
    blk_write_ops: int
    pids: int


@dataclass(frozen=True, slots=True)
class NetStats:
    """Totals over a network namespace's interfaces, loopback excluded."""

    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    tx_packets: int = 0


@dataclass(frozen=True, slots=True)
class Reading:
    """One read of one container at one monotonic instant."""

    at: datetime
    mono_s: float
    cgroup: CgroupStats
    net: NetStats


@functools.lru_cache(maxsize=4096)
def _ip(value: str | None) -> IPv4Address | None:
    """The label's IP, parsed once; a malformed label counts as no IP."""
    try:
        return IPv4Address(value) if value else None
    except ValueError:
        return None


def counter_delta(prev: int, cur: int) -> int:
    """The increase of a counter; a counter that went down was reset, so count from zero."""
    return cur - prev if cur >= prev else cur


def effective_limit(limit: int | None, host_memory: int) -> int:
    """The memory a container can use: its limit, or the host's memory when unlimited."""
    if limit is None or limit >= _NO_LIMIT:
        return host_memory
    return min(limit, host_memory)


def working_set(usage: int, inactive_file: int) -> int:
    """Usage minus inactive file cache (what the kernel can't easily reclaim), never negative."""
    return max(0, usage - inactive_file)


def cpu_percent(prev_ns: int, cur_ns: int, elapsed_s: float, quota_cpus: float) -> float:
    """CPU used between two samples as a % of the container's quota (100 = quota used fully)."""
    if elapsed_s <= 0 or quota_cpus <= 0:
        return 0.0
    used_s = counter_delta(prev_ns, cur_ns) / _NS
    return 100.0 * used_s / elapsed_s / quota_cpus


def build_sample(
    meta: ContainerMeta,
    cur: Reading,
    prev: Reading | None,
    *,
    host_cpus: int,
    host_memory: int,
) -> tuple[ContainerSample, dict[str, int | float]]:
    """The sample of ``cur`` (with ``prev`` for rates) and the counter deltas since ``prev``."""
    cg, net = cur.cgroup, cur.net
    quota = cg.quota_cpus if cg.quota_cpus and cg.quota_cpus > 0 else float(host_cpus)
    elapsed = cur.mono_s - prev.mono_s if prev is not None else 0.0
    pct = (
        cpu_percent(prev.cgroup.cpu_usage_ns, cg.cpu_usage_ns, elapsed, quota)
        if prev is not None
        else None
    )
    # model_construct: every field is computed here with its type; validating ~25 fields per
    # container per round would be a third of the round's CPU.
    sample = ContainerSample.model_construct(
        machine_id=meta.machine_id,
        container_id=meta.container_id,
        ip=_ip(meta.ip),
        app=meta.app,
        at=cur.at,
        interval_s=round(elapsed, 3),
        cpu_percent=None if pct is None else round(pct, 2),
        cpu_cores=None if pct is None else round(pct * quota / 100.0, 4),
        cpu_quota_cpus=quota,
        cpu_usage_s=cg.cpu_usage_ns / _NS,
        cpu_throttled_periods=cg.nr_throttled,
        cpu_throttled_s=cg.throttled_ns / _NS,
        mem_usage=cg.mem_usage,
        mem_working_set=working_set(cg.mem_usage, cg.mem_inactive_file),
        mem_rss=cg.mem_rss,
        mem_cache=cg.mem_cache,
        mem_limit=effective_limit(cg.mem_limit, host_memory),
        oom_kills=cg.oom_kills,
        net_rx_bytes=net.rx_bytes,
        net_tx_bytes=net.tx_bytes,
        net_rx_packets=net.rx_packets,
        net_tx_packets=net.tx_packets,
        blk_read_bytes=cg.blk_read_bytes,
        blk_write_bytes=cg.blk_write_bytes,
        blk_read_ops=cg.blk_read_ops,
        blk_write_ops=cg.blk_write_ops,
        pids=cg.pids,
    )
    deltas: dict[str, int | float] = {}
    if prev is not None:
        p, pn = prev.cgroup, prev.net
        deltas = {
            "cpu_throttled_s": counter_delta(p.throttled_ns, cg.throttled_ns) / _NS,
            "oom_kills": counter_delta(p.oom_kills, cg.oom_kills),
            "net_rx_bytes": counter_delta(pn.rx_bytes, net.rx_bytes),
            "net_tx_bytes": counter_delta(pn.tx_bytes, net.tx_bytes),
            "net_rx_packets": counter_delta(pn.rx_packets, net.rx_packets),
            "net_tx_packets": counter_delta(pn.tx_packets, net.tx_packets),
            "blk_read_bytes": counter_delta(p.blk_read_bytes, cg.blk_read_bytes),
            "blk_write_bytes": counter_delta(p.blk_write_bytes, cg.blk_write_bytes),
        }
    return sample, deltas


# ---------------------------------------------------------------- lifecycle


def event_id(container_id: str, action: str, time_ns: int, origin: str = "event") -> str:
    """A deterministic envelope id for a lifecycle event, so copies dedupe downstream."""
    key = f"dockvm-monitor:{origin}:{container_id}:{action}:{time_ns}"
    return uuid.uuid5(uuid.NAMESPACE_URL, key).hex


@dataclass(frozen=True, slots=True)
class Observed:
    """What a resync saw of one dockvm container through the Docker API."""

    meta: ContainerMeta
    running: bool
    started_ns: int
    finished_ns: int
    exit_code: int | None
    oom_killed: bool
    pid: int | None = None


@dataclass
class _Track:
    meta: ContainerMeta
    running: bool = False
    started_ns: int = 0
    last_action: str = ""
    last_oom_ns: int = 0
    restarted_for_ns: int = -1
    health: str | None = None
    restarts: deque[int] = field(default_factory=deque)
    flapping: bool = False


@dataclass(frozen=True, slots=True)
class Emit:
    """A lifecycle message to publish with its deterministic envelope id."""

    id: str
    message: Message


class LifecycleTracker:
    """Turns Docker events (and resync observations) into dockvm lifecycle events, once each.

    Duplicates are dropped on two levels: the raw key ``(id, timeNano, action)`` of a replayed
    event, and the container's state (a ``die`` for a container known stopped, a ``start``
    for the run already known). A restart is a ``restart`` action, or a ``start`` right after a
    ``die`` (the restart policy); ``threshold`` of them within ``window_s`` is flapping.
    """

    # A start seen through the API within this of the one we know is the same run.
    SAME_RUN_NS = 1 * _NS

    def __init__(
        self, host: str, *, window_s: int = 300, threshold: int = 3, memory: int = 4096
    ) -> None:
        self.host = host
        self.window_s = window_s
        self.threshold = threshold
        self._tracks: dict[str, _Track] = {}
        self._seen: deque[tuple[str, int, str]] = deque(maxlen=memory)
        self._seen_set: set[tuple[str, int, str]] = set()
        self._handled_until_ns = 0
        self.last_time_ns = 0

    def known(self, container_id: str) -> bool:
        """Whether the container is tracked."""
        return container_id in self._tracks

    def running_ids(self) -> set[str]:
        """Containers known to be running."""
        return {cid for cid, t in self._tracks.items() if t.running}

    def _remember(self, key: tuple[str, int, str]) -> bool:
        if key in self._seen_set:
            return False
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(key)
        self._seen_set.add(key)
        return True

    def _common(self, track: _Track, time_ns: int, synthesized: bool = False) -> dict[str, Any]:
        m = track.meta
        return {
            "machine_id": m.machine_id,
            "container_id": m.container_id,
            "host": self.host,
            "ip": m.ip,
            "app": m.app,
            "at": datetime.fromtimestamp(time_ns / _NS, UTC),
            "synthesized": synthesized,
        }

    def _restart(self, track: _Track, time_ns: int, origin: str, synth: bool) -> list[Emit]:
        track.restarted_for_ns = track.started_ns
        window = self.window_s * _NS
        track.restarts.append(time_ns)
        while track.restarts and track.restarts[0] < time_ns - window:
            track.restarts.popleft()
        n = len(track.restarts)
        common = self._common(track, time_ns, synth)
        cid = track.meta.container_id
        out = [
            Emit(
                event_id(cid, "restarted", time_ns, origin),
                ContainerRestarted(**common, restarts_in_window=n),
            )
        ]
        if n >= self.threshold and not track.flapping:
            track.flapping = True
            out.append(
                Emit(
                    event_id(cid, "flapping", time_ns, origin),
                    ContainerFlapping(
                        **common, restarts=n, window_s=self.window_s, threshold=self.threshold
                    ),
                )
            )
        elif n < self.threshold:
            track.flapping = False
        return out

    def on_event(self, event: Mapping[str, Any]) -> list[Emit]:
        """Handle one decoded Docker event (``type: container``); return what to publish."""
        if event.get("Type", "container") != "container":
            return []
        actor = event.get("Actor") or {}
        cid = actor.get("ID") or event.get("id") or ""
        attrs = actor.get("Attributes") or {}
        action = str(event.get("Action") or event.get("status") or "")
        time_ns = int(event.get("timeNano") or int(event.get("time", 0)) * _NS)
        if time_ns <= self._handled_until_ns or not self._remember((cid, time_ns, action)):
            return []
        if not cid:
            return []
        self.last_time_ns = max(self.last_time_ns, time_ns)
        track = self._tracks.get(cid)
        if track is None:
            meta = ContainerMeta.from_labels(cid, attrs)
            if meta is None:
                return []
            track = self._tracks[cid] = _Track(meta)
        out: list[Emit] = []
        common = self._common(track, time_ns)
        if action == "start":
            if track.running and abs(time_ns - track.started_ns) <= self.SAME_RUN_NS:
                return []  # the run a resync already reported
            after_die = track.last_action == "die"
            track.running, track.started_ns = True, time_ns
            out.append(Emit(event_id(cid, "start", time_ns), ContainerStarted(**common)))
            if after_die:
                out += self._restart(track, time_ns, "event", False)
        elif action == "restart":
            if track.restarted_for_ns != track.started_ns:
                out += self._restart(track, time_ns, "event", False)
        elif action == "die":
            if not track.running or time_ns < track.started_ns:
                track.last_action = action
                return []
            track.running = False
            code = attrs.get("exitCode")
            oom = 0 < time_ns - track.last_oom_ns < 10 * _NS
            out.append(
                Emit(
                    event_id(cid, "die", time_ns),
                    ContainerDied(
                        **common,
                        exit_code=int(code) if code not in (None, "") else None,
                        oom_killed=oom,
                    ),
                )
            )
        elif action == "oom":
            track.last_oom_ns = time_ns
            out.append(Emit(event_id(cid, "oom", time_ns), ContainerOomKilled(**common)))
        elif action.startswith("health_status"):
            status = action.split(":", 1)[-1].strip()
            if status != track.health:
                track.health = status
                out.append(
                    Emit(
                        event_id(cid, "health", time_ns),
                        ContainerHealth(**common, status=status),
                    )
                )
        elif action == "destroy":
            self._tracks.pop(cid, None)
            return []
        else:
            return []  # create, kill, stop, exec_*...: not lifecycle facts of their own
        if action in ("start", "die", "stop", "restart"):
            track.last_action = action
        return out

    def seed(self, observed: Iterable[Observed]) -> None:
        """Learn the current state without emitting anything (at service start)."""
        for o in observed:
            self._tracks[o.meta.container_id] = _Track(
                o.meta,
                running=o.running,
                started_ns=o.started_ns,
                restarted_for_ns=o.started_ns,
                last_action="start" if o.running else "die",
            )

    def snapshot(self) -> list[dict[str, Any]]:
        """What the tracker knows, as plain documents (stored so a restart resumes from it)."""
        return [
            {
                "container_id": t.meta.container_id,
                "machine_id": t.meta.machine_id,
                "ip": t.meta.ip,
                "app": t.meta.app,
                "running": t.running,
                "started_ns": t.started_ns,
                "last_action": t.last_action,
                "last_oom_ns": t.last_oom_ns,
                "restarted_for_ns": t.restarted_for_ns,
                "health": t.health,
                "restarts": list(t.restarts),
                "flapping": t.flapping,
            }
            for t in self._tracks.values()
        ]

    def restore(self, snapshot: Iterable[Mapping[str, Any]], handled_until_ns: int = 0) -> None:
        """Resume from a :meth:`snapshot` (then resync and replay what happened since).

        Events up to ``handled_until_ns`` were handled before the snapshot: their replay is
        dropped."""
        self._handled_until_ns = handled_until_ns
        for d in snapshot:
            meta = ContainerMeta(d["container_id"], d["machine_id"], d.get("ip"), d.get("app"))
            self._tracks[meta.container_id] = _Track(
                meta,
                running=d["running"],
                started_ns=int(d["started_ns"]),
                last_action=d.get("last_action", ""),
                last_oom_ns=int(d.get("last_oom_ns", 0)),
                restarted_for_ns=int(d.get("restarted_for_ns", -1)),
                health=d.get("health"),
                restarts=deque(int(x) for x in d.get("restarts", [])),
                flapping=bool(d.get("flapping")),
            )

    def resync(self, observed: Iterable[Observed], now_ns: int | None = None) -> list[Emit]:
        """Compare the API's view after a reconnect with ours; emit what the stream missed.

        ``now_ns`` dates the death of a running container that vanished altogether."""
        out: list[Emit] = []
        seen: set[str] = set()
        for o in observed:
            cid = o.meta.container_id
            seen.add(cid)
            track = self._tracks.get(cid)
            if track is None:
                track = self._tracks[cid] = _Track(o.meta)
            new_run = o.running and (
                not track.running or o.started_ns > track.started_ns + self.SAME_RUN_NS
            )
            if track.running and (not o.running or new_run):
                # It died while we were cut off (the exit of a new run's predecessor is lost
                # when the container is running again: its exit code is unknown then).
                died_ns = o.finished_ns if not o.running else max(o.started_ns - 1, 0)
                common = self._common(track, died_ns, True)
                out.append(
                    Emit(
                        event_id(cid, "die", died_ns, "sync"),
                        ContainerDied(
                            **common,
                            exit_code=None if o.running else o.exit_code,
                            oom_killed=o.oom_killed and not o.running,
                        ),
                    )
                )
                track.running = False
                track.last_action = "die"
            if new_run:
                was_running_before = track.last_action == "die"
                track.running, track.started_ns = True, o.started_ns
                common = self._common(track, o.started_ns, True)
                out.append(
                    Emit(event_id(cid, "start", o.started_ns, "sync"), ContainerStarted(**common))
                )
                if was_running_before:
                    out += self._restart(track, o.started_ns, "sync", True)
                track.last_action = "start"
        for cid in set(self._tracks) - seen:
            track = self._tracks.pop(cid)
            if track.running:  # removed while we were not looking: it died first
                died_ns = max(now_ns or 0, track.started_ns + 1)
                out.append(
                    Emit(
                        event_id(cid, "die", died_ns, "sync"),
                        ContainerDied(**self._common(track, died_ns, True)),
                    )
                )
        return out


def retention_cutoff(now: datetime, days: float) -> datetime:
    """The time before which samples are deleted."""
    return now - timedelta(days=days)
