"""Hosts as the gateway sees them: heartbeats, liveness, the machines they should hold, prewarm.

A host is known by its heartbeats alone. One whose heartbeats stop is ``down`` and its machines
``unreachable`` (never destroyed: the host may come back with them; each change is announced through
the machine's outbox); its next heartbeat brings them back to the state they had. A drained host
(:mod:`..drains`) is shown ``drained`` to placement, which skips it.

Prewarm: an image that arrives in a dc's registry (pushed or replicated) is pulled by the dc's
live hosts if the policy wants it (:mod:`..domain.prewarm`); a host that is new or back from down
catches up with what its dc's other hosts hold and its machines use.

Each announcement of the machines a host should hold carries the cluster id (:mod:`..cluster`);
the host quarantines what stays out of it, and what it reports of that (quarantines, their end,
alerts) is kept by :class:`HostReports` for ``GET /v1/hosts/{id}``.

Delivery guarantee: heartbeats are at least once and idempotent (an upsert of the host); a
host's status is compare-and-set, so two workers record one change once. Orphan reports are at
least once; each is inserted, never updated, and what holds is decided by the events' times
(:mod:`..quarantine`).
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import TYPE_CHECKING

import structlog

from libs.common.bus import host_key
from libs.common.contracts import provisioner

from ..documents import HostDoc
from ..domain import HostView, Ratios, Res, State, host_status
from ..domain.prewarm import catch_up, wanted
from ..domain.states import allowed_from
from ..quarantine import QuarantineDoc, QuarantineStore
from ..settings import GatewaySettings
from .steps import Op

if TYPE_CHECKING:
    from .driver import SagaDriver

__all__ = ["HostReports", "Hosts", "host_views"]

log = structlog.get_logger("gateway.hosts")


def host_views(
    hosts: list[HostDoc],
    allocations: dict[str, Res],
    settings: GatewaySettings,
    at: datetime,
    drained: Collection[str] = (),
) -> list[HostView]:
    """Placement's view of the hosts: liveness from heartbeat age (``drained`` for a live host
    in ``drained``: placement skips it), allocation from our records."""
    views = []
    for h in hosts:
        cap = h.get("capacity") or {}
        labels = h.get("labels") or {}
        age = (at - h["last_seen"]).total_seconds()
        status = host_status(age, settings.host_stale_s, settings.host_down_s)
        views.append(
            HostView(
                host_id=h["_id"],
                dc=h["dc"],
                status="drained" if status != "down" and h["_id"] in drained else status,
                capacity=Res(
                    cap.get("cpus", 0.0), int(cap.get("memory", 0)), int(cap.get("disk", 0))
                ),
                allocated=allocations.get(h["_id"], Res()),
                ratios=Ratios(
                    float(labels.get("dockvm.overcommit.cpu", settings.overcommit_cpu)),
                    float(labels.get("dockvm.overcommit.memory", settings.overcommit_memory)),
                    float(labels.get("dockvm.overcommit.disk", settings.overcommit_disk)),
                ),
            )
        )
    return views


class Hosts:
    """Records heartbeats, marks silent hosts down, tells hosts what to keep and to prewarm."""

    def __init__(self, driver: SagaDriver) -> None:
        self._driver = driver
        # The control plane's id (:mod:`..cluster`), set at start; None: nothing is announced.
        self.cluster_id: str | None = None

    def _status(self, host: HostDoc, at: datetime) -> str:
        age = (at - host["last_seen"]).total_seconds()
        s = self._driver.settings
        return host_status(age, s.host_stale_s, s.host_down_s)

    async def on_heartbeat(self, hb: provisioner.HostHeartbeat) -> None:
        """Record the host; machines marked unreachable while it was down come back; a host that is
        new or back from down catches up with the images its dc prewarms."""
        d = self._driver
        host: HostDoc = {
            "_id": hb.host_id,
            "dc": hb.dc,
            "labels": hb.labels,
            "capacity": hb.capacity.model_dump(exclude={"TYPE"}),
            "reported": hb.allocated.model_dump(exclude={"TYPE"}),
            "machines": hb.machines,
            "images": hb.images,
            "version": hb.version,
            "last_seen": d.clock(),
            "status": "online",
            "min_disk": hb.min_disk_bytes,
        }
        before = await d.store.record_heartbeat(host)
        for doc in await d.store.unknown_on_host(hb.host_id):
            await d.move(
                doc,
                [doc["state"]],  # unreachable, or unknown as stored before the rename
                doc.get("state_before_unknown") or State.RUNNING,
                reason="host_back",
            )
        if before is None or self._status(before, host["last_seen"]) == "down":
            await self._catch_up(host)

    async def _catch_up(self, host: HostDoc) -> None:
        """Ask a host that is new or back for what its dc prewarms and it lacks."""
        d = self._driver
        peers = [
            ref
            for h in await d.store.list_hosts()
            if h["dc"] == host["dc"] and h["_id"] != host["_id"]
            for ref in h.get("images") or []
        ]
        in_use = await d.store.images_in_use(host["dc"])
        refs = catch_up(d.settings.prewarm_policy, peers, in_use, host["images"])
        for ref in refs:
            await d.publisher.publish(
                provisioner.ImagePrewarm(ref=ref),
                routing_key=host_key(host["_id"], provisioner.ImagePrewarm.TYPE),
            )
        if refs:
            log.info("prewarming a host on its return", host=host["_id"], images=len(refs))

    async def check_hosts(self) -> None:
        """Mark the machines of hosts whose heartbeats stopped ``unreachable`` (never destroy them),
        each change announced (``machine.state_changed``) through the machine's outbox."""
        d = self._driver
        at = d.clock()
        for h in await d.store.list_hosts():
            status = self._status(h, at)
            if status == h.get("status"):
                continue
            if not await d.store.set_host_status(h["_id"], h.get("status"), status):
                continue
            if status != "down":
                continue
            changed = 0
            for mid in await d.store.ids_on_host(h["_id"], [State.RUNNING, State.STOPPED]):
                doc = await d.store.get(mid)
                if doc is None or doc["state"] not in (State.RUNNING, State.STOPPED):
                    continue
                moved = await d.move(
                    doc,
                    [doc["state"]],
                    State.UNREACHABLE,
                    reason="host_down",
                    set_={"state_before_unknown": doc["state"]},
                )
                changed += moved is not None
            log.warning("host down", host=h["_id"], machines=changed)

    async def announce_known(self) -> None:
        """Tell each live host which machines we hold on it, so it can quarantine orphans."""
        d = self._driver
        if self.cluster_id is None:
            # A list without an id is ignored by every agent: say so rather than send it.
            log.error("no cluster id: machines.known not announced")
            return
        at = d.clock()
        # A migrating machine is its current host's (the source's until imported, then the
        # target's): no agent may take it for an orphan meanwhile.
        keep = [*allowed_from(Op.DESTROY), State.MIGRATING.value]
        for h in await d.store.list_hosts():
            if self._status(h, at) != "online":
                continue
            ids = await d.store.ids_on_host(h["_id"], keep)
            await d.publisher.publish(
                provisioner.MachinesKnown(machine_ids=ids, cluster_id=self.cluster_id),
                routing_key=host_key(h["_id"], provisioner.MachinesKnown.TYPE),
            )

    async def prewarm(self, dc: str, ref: str) -> int:
        """Ask every live host of ``dc`` to pull ``ref``; return how many were asked."""
        d = self._driver
        at, asked = d.clock(), 0
        for h in await d.store.list_hosts():
            if h["dc"] != dc or self._status(h, at) == "down":
                continue
            await d.publisher.publish(
                provisioner.ImagePrewarm(ref=ref),
                routing_key=host_key(h["_id"], provisioner.ImagePrewarm.TYPE),
            )
            asked += 1
        return asked

    async def on_image_arrived(self, dc: str, ref: str) -> int:
        """An image was pushed to (or replicated into) ``dc``'s registry: prewarm it on the
        dc's live hosts if the policy wants it; how many hosts were asked."""
        d = self._driver
        policy = d.settings.prewarm_policy
        in_use = await d.store.images_in_use(dc) if policy == "in-use" else set()
        if not wanted(policy, ref, in_use):
            log.debug("image not prewarmed by policy", dc=dc, ref=ref, policy=policy)
            return 0
        return await self.prewarm(dc, ref)


class HostReports:
    """Keeps what hosts report of their orphans: quarantines, their end, and alerts."""

    def __init__(self, store: QuarantineStore) -> None:
        self.store = store

    async def on_quarantined(self, msg: provisioner.ContainerQuarantined) -> None:
        """A host quarantined an orphan (or says again that it holds one)."""
        doc: QuarantineDoc = {
            "host": msg.host,
            "machine_id": msg.machine_id,
            "quarantined_at": msg.quarantined_at,
            "container_id": msg.container_id,
            "was_running": msg.was_running,
            "purge_after": msg.purge_after,
            "cluster_id": msg.cluster_id,
        }
        # Agents repeat it every reconcile: only news is logged.
        if await self.store.add_quarantine(doc):
            log.warning("host quarantined an orphan", host=msg.host, machine_id=msg.machine_id)

    async def on_ended(self, host: str, machine_id: str, state: str, at: datetime) -> None:
        """A quarantine ended at ``at``: ``released`` (named again) or ``purged`` (deleted)."""
        await self.store.add_end(host, machine_id, state, at)

    async def on_alert(self, msg: provisioner.HostAlert) -> None:
        """A host raised (or cleared) an alert."""
        if not msg.cleared:
            log.error("host alert", host=msg.host, reason=msg.reason, detail=msg.detail)
        await self.store.alert(
            {
                "host": msg.host,
                "reason": msg.reason,
                "detail": msg.detail,
                "count": msg.count,
                "cleared": msg.cleared,
                "at": msg.at,
            }
        )
