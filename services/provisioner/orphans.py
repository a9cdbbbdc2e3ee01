"""The agent's orphans: the cluster it belongs to, which of its machines the control plane no
longer names, and their quarantine (stop, keep the disk, keep a record) instead of deletion.

A gateway on an empty or wrong database announces empty lists; deleting what it does not name
would empty every host. So an orphan is never deleted on sight:

- a ``machines.known`` list counts only if it comes from this agent's cluster. The agent adopts
  the first cluster id it hears and keeps it in ``<state>/orphans/cluster_id`` (so a restart
  keeps it); a list of another cluster, or without an id, is ignored, logged, counted and
  raised once per id as ``host.alert`` (``foreign_cluster``). To move an agent to a new control
  plane on purpose, stop it, delete that file and start it (its containers labelled with the old
  cluster are then another cluster's, left alone: move a host once it is empty);
- only containers labelled with this host (and this cluster, or none) are candidates
  (:func:`~.domain.ownership`); one made before the labels, whose disk is under this state dir,
  is reported and healed but never taken for an orphan;
- a machine due after the grace period is quarantined: its record is written first
  (``<state>/orphans/quarantine/<machine_id>.json``), then it is stopped; ``container.quarantined``
  follows. Its disk and container stay. A sweep with more due than the cap (or the fraction of
  the host's machines) quarantines none and raises ``host.alert`` (``orphan_sweep_capped``);
- a quarantined machine named again by a list of this cluster is released: started again if it
  was running, its record dropped, ``container.unquarantined``;
- it is deleted (container, disk, files, port; ``container.destroyed`` with reason ``orphan``)
  only on ``orphan.purge`` or once ``orphan_retention_s`` has passed since its quarantine.

Delivery guarantee: each event is published after the step it reports, at least once while
the state lasts: every sweep says ``container.quarantined`` again for each record on disk (the
record is the truth; the gateway's upsert absorbs repeats), so a lost one, or a gateway database
rebuilt, is made good within a reconcile. A ``container.destroyed`` whose publish fails for good
is logged; a purge's requester also has it as the command's answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from prometheus_client import Counter, Gauge

from libs.common.clock import utcnow
from libs.common.contracts import Message
from libs.common.contracts.provisioner import (
    ContainerDestroyed,
    ContainerQuarantined,
    ContainerUnquarantined,
    HostAlert,
    MachinesKnown,
    OrphanPurge,
    OrphanPurgeRefused,
)
from libs.common.errors import DomainError, TransientError

from .adapters.runtime import ContainerRuntime
from .domain import (
    ListVerdict,
    OrphanTracker,
    Ownership,
    QuarantineRecord,
    admit_list,
    check_machine_id,
    expired,
    ownership,
    plan_sweep,
)

if TYPE_CHECKING:
    from .service import ProvisionerService

__all__ = ["OrphanBook", "Orphans"]

log = structlog.get_logger("provisioner.orphans")

_QUARANTINED = Gauge(
    "dockvm_provisioner_quarantined_machines", "Machines in quarantine on this host", ["host"]
)
_DUE = Gauge(
    "dockvm_provisioner_orphans_due", "Orphans due for quarantine at the last sweep", ["host"]
)
_REFUSED = Counter(
    "dockvm_provisioner_orphan_sweeps_refused_total",
    "Sweeps that quarantined none because too many orphans were due",
    ["host"],
)
_IGNORED = Counter(
    "dockvm_provisioner_known_lists_ignored_total",
    "machines.known lists ignored: of another cluster (foreign) or of none (anonymous)",
    ["host", "verdict"],
)
_DONE = Counter(
    "dockvm_provisioner_orphans_total",
    "Orphan outcomes: quarantined, released, purged, retained_out",
    ["host", "outcome"],
)


class OrphanBook:
    """The agent's orphan state on disk: its cluster id and one record per quarantined machine.

    ``root`` None keeps it in memory (unit tests). Each file is written whole to a temporary
    name and renamed, so a crash leaves the old or the new file, never half of one.
    """

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.cluster_id: str | None = None
        self._records: dict[str, QuarantineRecord] = {}
        if root is not None:
            self._load(root)

    def _load(self, root: Path) -> None:
        ids = root / "cluster_id"
        if ids.exists():
            self.cluster_id = ids.read_text().strip() or None
        for path in sorted((root / "quarantine").glob("*.json")):
            try:
                data = json.loads(path.read_text())
                record = QuarantineRecord(
                    machine_id=data["machine_id"],
                    container_id=data.get("container_id"),
                    was_running=bool(data.get("was_running")),
                    quarantined_at=datetime.fromisoformat(data["quarantined_at"]),
                    cluster_id=data.get("cluster_id"),
                )
            except (ValueError, KeyError, TypeError) as err:
                # Its machine is then an orphan candidate again: quarantined anew, not deleted.
                log.error("unreadable quarantine record skipped", path=str(path), error=str(err))
                continue
            self._records[record.machine_id] = record

    def _write(self, path: Path, text: str) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(path)

    def adopt(self, cluster_id: str) -> None:
        """Join ``cluster_id`` for good."""
        if self.root is not None:
            self._write(self.root / "cluster_id", cluster_id + "\n")
        self.cluster_id = cluster_id

    def records(self) -> list[QuarantineRecord]:
        """Every quarantined machine."""
        return list(self._records.values())

    def get(self, machine_id: str) -> QuarantineRecord | None:
        """The record of a quarantined machine, or None."""
        return self._records.get(machine_id)

    def put(self, record: QuarantineRecord) -> None:
        """Keep ``record`` (before the machine is stopped)."""
        if self.root is not None:
            path = self._path(self.root, record.machine_id)
            data = {
                "machine_id": record.machine_id,
                "container_id": record.container_id,
                "was_running": record.was_running,
                "quarantined_at": record.quarantined_at.isoformat(),
                "cluster_id": record.cluster_id,
            }
            self._write(path, json.dumps(data, indent=1) + "\n")
        self._records[record.machine_id] = record

    def drop(self, machine_id: str) -> None:
        """Forget a released or purged machine."""
        if self.root is not None:
            self._path(self.root, machine_id).unlink(missing_ok=True)
        self._records.pop(machine_id, None)

    @staticmethod
    def _path(root: Path, machine_id: str) -> Path:
        check_machine_id(machine_id)  # it names a file: never a path of its own
        return root / "quarantine" / f"{machine_id}.json"


class Orphans:
    """One agent's orphan policy: which lists count, what is an orphan, quarantine and purge."""

    def __init__(
        self,
        agent: ProvisionerService,
        root: Path | None,
        wall_clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.agent = agent
        self.config = agent.config
        self.book = OrphanBook(root)
        self.tracker = OrphanTracker(agent.config.orphan_grace_s)
        self.wall_clock = wall_clock
        self._alerted: set[str] = set()  # foreign cluster ids already raised
        self._capped = False
        _QUARANTINED.labels(agent.host).set(len(self.book.records()))

    @property
    def host(self) -> str:
        """This host's id."""
        return self.agent.host

    @property
    def cluster_id(self) -> str | None:
        """The cluster this agent belongs to (None until it heard one)."""
        return self.book.cluster_id

    # ---- what counts -----------------------------------------------------------------------

    async def record_known(self, cmd: MachinesKnown) -> None:
        """Use the control plane's list if it is this agent's cluster's; else ignore it."""
        verdict = admit_list(self.cluster_id, cmd.cluster_id)
        if cmd.cluster_id is None or verdict in (ListVerdict.FOREIGN, ListVerdict.ANONYMOUS):
            await self._ignored(verdict, cmd)
            return
        if verdict is ListVerdict.ADOPT:
            self.book.adopt(cmd.cluster_id)
            log.info("joined the control plane's cluster", cluster_id=cmd.cluster_id)
        self.tracker.update_known(cmd.machine_ids, self.agent.clock())

    async def _ignored(self, verdict: ListVerdict, cmd: MachinesKnown) -> None:
        _IGNORED.labels(self.host, verdict.value).inc()
        log.warning(
            "list of known machines ignored",
            verdict=verdict.value,
            cluster_id=cmd.cluster_id,
            ours=self.cluster_id,
            machines=len(cmd.machine_ids),
        )
        key = cmd.cluster_id or ""
        if key in self._alerted:
            return
        self._alerted.add(key)
        detail = (
            f"a list of {len(cmd.machine_ids)} known machines from cluster "
            f"{cmd.cluster_id or '(none)'} was ignored: this agent belongs to "
            f"{self.cluster_id or '(none yet)'}"
        )
        await self._alert("foreign_cluster", detail, len(cmd.machine_ids))

    def is_orphan(self, machine_id: str) -> bool:
        """Absent from the latest list of this cluster (False while none arrived)."""
        return self.tracker.is_orphan(machine_id)

    def is_quarantined(self, machine_id: str) -> bool:
        """Whether the machine is in quarantine."""
        return self.book.get(machine_id) is not None

    def owner(self, labels: dict[str, str], *, has_disk: bool) -> Ownership:
        """Whose a labelled container on this engine is."""
        return ownership(labels, self.host, self.cluster_id, has_disk=has_disk)

    def forget(self, machine_id: str) -> None:
        """A machine was removed: stop tracking it."""
        self.tracker.forget(machine_id)

    # ---- the sweep ---------------------------------------------------------------------------

    async def sweep(self, present: Iterable[str], runtime: ContainerRuntime) -> None:
        """Release what is named again, purge what was retained out, quarantine what is due."""
        present = set(present)
        for record in self.book.records():
            if self.tracker.is_known(record.machine_id):
                await self._release(record.machine_id, runtime)
            else:
                await self._repeat(record.machine_id)
        retention = self.config.orphan_retention_s
        for machine_id in expired(self.book.records(), self.wall_clock(), retention):
            log.warning("quarantine retention over, deleting", machine_id=machine_id)
            result = await self._purge(machine_id, "retained_out")
            if isinstance(result, ContainerDestroyed):
                await self._publish(result)
        candidates = present - {r.machine_id for r in self.book.records()}
        due = self.tracker.sweep(candidates, self.agent.clock())
        _DUE.labels(self.host).set(len(due))
        plan = plan_sweep(
            due,
            len(present),
            cap=self.config.orphan_sweep_cap,
            fraction=self.config.orphan_sweep_fraction,
        )
        if plan.refused is not None:
            await self._refuse(plan.refused, due)
            return
        if self._capped:
            self._capped = False
            await self._alert("orphan_sweep_capped", "orphans due are back under the cap", 0, True)
        for machine_id in plan.quarantine:
            await self._quarantine(machine_id, runtime)
        _QUARANTINED.labels(self.host).set(len(self.book.records()))

    async def _refuse(self, why: str, due: list[str]) -> None:
        _REFUSED.labels(self.host).inc()
        self._capped = True
        log.error(
            "orphan sweep refused: quarantining none",
            reason=why,
            due=len(due),
            first=due[:10],
            cluster_id=self.cluster_id,
        )
        await self._alert("orphan_sweep_capped", f"{why}; none quarantined", len(due))

    async def _quarantine(self, machine_id: str, runtime: ContainerRuntime) -> None:
        async with self.agent.lock(machine_id):
            if not self.tracker.is_orphan(machine_id) or self.is_quarantined(machine_id):
                return
            try:
                info = await runtime.find(machine_id)
                record = QuarantineRecord(
                    machine_id=machine_id,
                    container_id=info.id if info is not None else None,
                    was_running=info is not None and info.running,
                    quarantined_at=self.wall_clock(),
                    cluster_id=self.cluster_id,
                )
                # The record first: a crash after it leaves a quarantined machine, not a
                # stopped one that nothing remembers having stopped.
                self.book.put(record)
                if record.was_running:
                    await runtime.stop(machine_id, self.config.stop_timeout_s)
            except (DomainError, TransientError) as err:
                # Not stopped: no record either, so the next sweep tries again from the start.
                self.book.drop(machine_id)
                log.error("quarantine failed", machine_id=machine_id, error=str(err))
                return
            self.tracker.forget(machine_id)
        _DONE.labels(self.host, "quarantined").inc()
        log.warning("orphan quarantined", machine_id=machine_id, was_running=record.was_running)
        await self._publish(self._quarantined(record))

    async def _repeat(self, machine_id: str) -> None:
        """Say again that the machine is in quarantine; under its lock, so a purge's end is
        always published after it, never before."""
        async with self.agent.lock(machine_id):
            record = self.book.get(machine_id)
            if record is not None:
                await self._publish(self._quarantined(record))

    def _quarantined(self, record: QuarantineRecord) -> ContainerQuarantined:
        return ContainerQuarantined(
            host=self.host,
            machine_id=record.machine_id,
            container_id=record.container_id,
            was_running=record.was_running,
            quarantined_at=record.quarantined_at,
            purge_after=record.purge_after(self.config.orphan_retention_s),
            cluster_id=record.cluster_id,
        )

    async def _release(self, machine_id: str, runtime: ContainerRuntime) -> None:
        """The control plane names it again: back as it was before the quarantine."""
        async with self.agent.lock(machine_id):
            record = self.book.get(machine_id)
            if record is None or not self.tracker.is_known(machine_id):
                return
            started = False
            try:
                info = await runtime.find(machine_id)
                if info is not None and record.was_running and not info.running:
                    await self.agent.volumes.mount(machine_id)
                    info = await runtime.start(machine_id)
                    await self.agent.network.plumb(info)
                    await self.agent.secure(info)
                    started = True
            except (DomainError, TransientError) as err:
                log.error("release from quarantine failed", machine_id=machine_id, error=str(err))
                return
            self.book.drop(machine_id)
        _DONE.labels(self.host, "released").inc()
        _QUARANTINED.labels(self.host).set(len(self.book.records()))
        log.warning("quarantined machine named again, released", machine_id=machine_id)
        await self._publish(
            ContainerUnquarantined(host=self.host, machine_id=machine_id, started=started)
        )

    # ---- deletion ----------------------------------------------------------------------------

    async def purge(self, cmd: OrphanPurge) -> ContainerDestroyed | OrphanPurgeRefused:
        """``orphan.purge`` → ``container.destroyed`` (reason orphan) or a refusal."""
        if cmd.deadline is not None and self.wall_clock() > cmd.deadline:
            log.warning("orphan purge past its deadline refused", machine_id=cmd.machine_id)
            return OrphanPurgeRefused(host=self.host, machine_id=cmd.machine_id, reason="expired")
        return await self._purge(cmd.machine_id, "purged")

    async def _purge(
        self, machine_id: str, outcome: str
    ) -> ContainerDestroyed | OrphanPurgeRefused:
        async with self.agent.lock(machine_id):
            if self.book.get(machine_id) is None:
                return OrphanPurgeRefused(
                    host=self.host, machine_id=machine_id, reason="not_quarantined"
                )
            try:
                await self.agent.remove_machine(machine_id, self.config.stop_timeout_s)
            except (DomainError, TransientError) as err:
                log.error("orphan purge failed", machine_id=machine_id, error=str(err))
                return OrphanPurgeRefused(
                    host=self.host,
                    machine_id=machine_id,
                    reason=err.reason if isinstance(err, DomainError) else "transient",
                    retriable=isinstance(err, TransientError),
                )
            self.book.drop(machine_id)
        _DONE.labels(self.host, outcome).inc()
        _QUARANTINED.labels(self.host).set(len(self.book.records()))
        log.warning("quarantined machine deleted", machine_id=machine_id, outcome=outcome)
        return ContainerDestroyed(machine_id=machine_id, host=self.host, reason="orphan")

    # ---- the bus -----------------------------------------------------------------------------

    async def _alert(self, reason: str, detail: str, count: int, cleared: bool = False) -> None:
        await self._publish(
            HostAlert(
                host=self.host,
                reason=reason,
                detail=detail,
                count=count,
                cleared=cleared,
                at=self.wall_clock(),
            )
        )

    async def _publish(self, event: Message) -> None:
        try:
            await self.agent.publisher.publish(event)
        except Exception as err:
            # The record on disk is the truth; the next sweep or a purge says it again.
            log.error("orphan event not published", event=type(event).__name__, error=repr(err))
