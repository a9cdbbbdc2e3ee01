"""Cold migration: a container machine's disk and identity move to another host of its dc.

The saga ``migrate`` has four steps, each one command to one agent:

- ``export`` (source): stop the machine, detach its disk, offer disk and identity (SSH host
  keys, /app) for one import, under a one-time token made here;
- ``import`` (target): copy the disk from the source's offer, make the container with the same
  IP, MAC (derived from the id), hostname and identity, start it if it ran;
- ``finish`` (source, once imported): remove what is left there (container, volume file, loop
  device, files, port); the machine's ``host`` is already the target;
- ``revert`` (source, when export, import or their answers fail): re-attach the disk and start
  the machine where it was, same identity. A target that never answered is told to destroy
  what it may have made, and an import still queued past its deadline is refused there.

The machine is ``migrating`` throughout, and each step is a transition (``migrating`` to
``migrating`` with a reason: exported, imported), so its history and ``machine.state_changed``
show the progress; the operation ends in the state it had (``last_op`` ok, or not with the
reason it went back). A machine the source could not start again, or whose source never
answered the switch back, is ``unreachable`` until a reconcile observes it.

Placement chooses the target when none is given (never the source, never a host that is down,
stale or drained); the target's room is checked here, and again by its agent. The machine counts
for its source's allocation until the import, for its target's after.

Delivery guarantee: at least once, as every saga (:mod:`.driver`): each result is applied only
at the step that expects it, and each agent command is idempotent by machine_id.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import structlog

from libs.common.bus import host_key
from libs.common.contracts import provisioner
from libs.common.errors import ConflictError, ValidationFailed

from ..documents import MachineDoc
from ..domain import Res, State, host_status, place_all
from .hosts import host_views
from .lifecycle import send_action
from .steps import Op, SagaMatch, StepSpec, StepTable, new_op_id, saga_of, timeout_reason

if TYPE_CHECKING:
    from .driver import SagaDriver

__all__ = ["MIGRATE", "MigrateSaga", "MigrateStep"]

log = structlog.get_logger("gateway.migrate")

MIGRATE = "migrate"
# An import copies a whole disk: it gets longer than a create before it is re-sent (a re-sent
# import waits for the first, by the machine's lock on the target, and answers with it); a
# target whose heartbeats stopped meanwhile is given up on at the first re-send, so the machine
# is back on its source within about this.
IMPORT_TIMEOUT_FLOOR_S = 300.0


class MigrateStep(StrEnum):
    """The steps of a migration."""

    EXPORT = "export"
    IMPORT = "import"
    FINISH = "finish"
    REVERT = "revert"


class MigrateSaga:
    """Starts migrations, applies the agents' answers, and gives up on silent ones."""

    def __init__(self, driver: SagaDriver) -> None:
        self._driver = driver

    def register(self, table: StepTable) -> None:
        """Add the migration's steps to ``table``."""
        s = self._driver.settings
        act_s = s.action_step_timeout_s
        import_s = max(s.container_step_timeout_s, IMPORT_TIMEOUT_FLOOR_S)
        steps = (
            (MigrateStep.EXPORT, self._send_export, act_s + s.action_step_timeout_s,
             self._export_silent),
            (MigrateStep.IMPORT, self._send_import, import_s, self._import_silent),
            (MigrateStep.FINISH, self._send_finish, act_s, self._finish_silent),
            (MigrateStep.REVERT, self._send_revert, act_s, self._revert_silent),
        )  # fmt: skip
        for step, send, timeout_s, on_exhausted in steps:
            table.register(MIGRATE, step, StepSpec(send, timeout_s, on_exhausted=on_exhausted))

    # --- request ----------------------------------------------------------------------------

    async def begin(self, machine_id: str, target: str | None) -> tuple[MachineDoc, str]:
        """Start migrating the machine to ``target`` (placement's choice if None); return the
        machine and the operation id. Nothing is changed when it is refused."""
        d = self._driver
        doc = await d.require(machine_id, idle=True)
        if doc["type"] != "docker" or not doc.get("host"):
            raise ConflictError(
                f"{machine_id} is not a container on a host: only those migrate",
                reason="invalid_state",
            )
        if doc["state"] not in (State.RUNNING, State.STOPPED):
            raise ConflictError(
                f"cannot migrate a machine in state {doc['state']} (running or stopped only)",
                reason="invalid_state",
            )
        chosen = await self.choose(doc, target)
        op_id = new_op_id()
        params = {
            "op_id": op_id,
            "source": doc["host"],
            "target": chosen,
            "start": doc["state"] == State.RUNNING,
            # One-time credential of the disk's transfer between the two agents.
            "token": secrets.token_urlsafe(32),
        }
        moved = await d.move(
            doc,
            [doc["state"]],
            State.MIGRATING,
            reason=f"migrating from {doc['host']} to {chosen}",
            set_={"state_before_op": doc["state"]},
            saga=d.saga(MIGRATE, MigrateStep.EXPORT, **params),
        )
        if moved is None:
            raise ConflictError(f"{machine_id} changed meanwhile; try again", reason="machine_busy")
        log.info("migration started", machine_id=machine_id, source=doc["host"], target=chosen)
        await d.send_step(moved)
        return moved, op_id

    async def choose(self, doc: MachineDoc, target: str | None) -> str:
        """The target host: ``target`` if it can take the machine, else placement's choice;
        ValidationFailed (unknown, same host, other dc) or ConflictError (down, stale,
        drained, full) naming why not."""
        d = self._driver
        dc, source = doc["dc"], doc["host"]
        load = await d.store.load(dc)
        views = host_views(
            await d.store.list_hosts(),
            load.allocated,
            d.settings,
            d.clock(),
            await d.store.drains.drained(),
        )
        need = [(doc["app"], Res(float(doc["cpus"]), int(doc["memory"]), int(doc["disk"])))]
        if target is None:
            others = [v for v in views if v.host_id != source]
            chosen = place_all(others, need, dc, load)
            if not chosen or chosen[0] is None:
                raise ConflictError(
                    f"no other host of {dc} (online, not drained) has room for {doc['_id']}",
                    reason="no_capacity",
                )
            return chosen[0]
        view = next((v for v in views if v.host_id == target), None)
        if view is None:
            raise ValidationFailed(f"no host {target}", reason="unknown_host")
        if target == source:
            raise ValidationFailed(f"{doc['_id']} is on {target} already", reason="same_host")
        if view.dc != dc:
            raise ValidationFailed(
                f"{target} is in {view.dc}, the machine in {dc}: a migration stays in its dc",
                reason="other_dc",
            )
        if view.status != "online":
            raise ConflictError(f"host {target} is {view.status}", reason="host_unavailable")
        if not place_all([view], need, dc, load) or not view.fits(need[0][1]):
            raise ConflictError(f"host {target} has no room for {doc['_id']}", reason="no_capacity")
        return target

    # --- the steps' commands ----------------------------------------------------------------

    async def _publish(self, host: str, cmd: Any) -> None:
        await self._driver.publisher.publish(cmd, routing_key=host_key(host, cmd.TYPE))

    async def _send_export(self, doc: MachineDoc) -> None:
        p = _params(doc)
        await self._publish(p["source"], provisioner.MachineExport(
            machine_id=doc["_id"], token=p["token"], timeout_s=self._stop_s()))  # fmt: skip

    async def _send_import(self, doc: MachineDoc) -> None:
        saga, p = saga_of(doc), _params(doc)
        if saga["attempt"] > 1 and not await self._online(p["target"]):
            # A re-send to a dead host would only keep the machine stopped longer.
            await self._import_silent(doc, {})
            return
        # Past the step's deadline the target refuses it: then we have given up on it.
        deadline = saga["deadline"] + timedelta(seconds=5)
        await self._publish(p["target"], provisioner.MachineImport(
            machine_id=doc["_id"], app=doc["app"], image=doc["image"], cpus=doc["cpus"],
            memory=doc["memory"], disk=doc["disk"], ip=doc["ip"], prefix_len=doc["prefix_len"],
            gateway=doc["gateway"], vlan_id=doc["vlan_id"], hostname=doc["hostname"],
            ssh_authorized_keys=doc.get("ssh_keys") or [],
            direct_ssh=bool(doc.get("direct_ssh")), source_url=p["url"], token=p["token"],
            start=bool(p["start"]), deadline=deadline,
        ))  # fmt: skip

    async def _send_finish(self, doc: MachineDoc) -> None:
        await self._publish(_params(doc)["source"], provisioner.MachineExportEnd(
            machine_id=doc["_id"], outcome="moved", timeout_s=self._stop_s()))  # fmt: skip

    async def _send_revert(self, doc: MachineDoc) -> None:
        p = _params(doc)
        await self._publish(p["source"], provisioner.MachineExportEnd(
            machine_id=doc["_id"], outcome="back", start=bool(p["start"]),
            timeout_s=self._stop_s()))  # fmt: skip

    async def _online(self, host_id: str) -> bool:
        """Whether ``host_id``'s heartbeats are recent (online or drained, not stale or down)."""
        d = self._driver
        host = next((h for h in await d.store.list_hosts() if h["_id"] == host_id), None)
        if host is None:
            return False
        age = (d.clock() - host["last_seen"]).total_seconds()
        return host_status(age, d.settings.host_stale_s, d.settings.host_down_s) == "online"

    def _stop_s(self) -> int:
        return int(min(600, max(1, self._driver.settings.action_step_timeout_s // 2)))

    # --- the agents' answers ----------------------------------------------------------------

    async def _at(self, machine_id: str, step: MigrateStep) -> MachineDoc | None:
        """The machine if its migration is at ``step`` (else a late or repeated answer)."""
        doc = await self._driver.store.get(machine_id)
        saga = (doc or {}).get("saga") or {}
        if doc is None or saga.get("op") != MIGRATE or saga.get("step") != step:
            return None
        return doc

    async def _step(
        self,
        doc: MachineDoc,
        step: MigrateStep,
        reason: str,
        set_: dict[str, Any] | None = None,
        **params: Any,
    ) -> None:
        """On to ``step`` (recorded as a transition with ``reason``), and send it."""
        d = self._driver
        merged = {**_params(doc), **params}
        moved = await d.move(
            doc, [State.MIGRATING], State.MIGRATING, reason=reason, set_=set_ or {},
            saga=d.saga(MIGRATE, step, **merged),
        )  # fmt: skip
        if moved is not None:
            await d.send_step(moved)

    async def on_exported(self, msg: provisioner.MachineExported) -> None:
        """The source stopped the machine and offers it: import it on the target."""
        doc = await self._at(msg.machine_id, MigrateStep.EXPORT)
        if doc is None or msg.host != _params(doc)["source"]:
            return
        reason = f"exported from {msg.host} ({msg.disk >> 20} MiB disk)"
        await self._step(doc, MigrateStep.IMPORT, reason, url=msg.url)

    async def on_export_failed(self, msg: provisioner.MachineExportFailed) -> None:
        """Nothing left the source, which kept the machine as it was: the migration ends."""
        doc = await self._at(msg.machine_id, MigrateStep.EXPORT)
        if doc is not None:
            await self._end(doc, False, f"export_failed: {msg.reason}")

    async def on_imported(self, msg: provisioner.MachineImported) -> None:
        """The machine is on the target: it is the machine's host now; clean the source."""
        doc = await self._at(msg.machine_id, MigrateStep.IMPORT)
        if doc is None or msg.host != _params(doc)["target"]:
            return
        reason = f"imported on {msg.host} ({msg.bytes_copied >> 20} MiB copied)"
        fields = {"host": msg.host, "container_id": msg.container_id}
        await self._step(doc, MigrateStep.FINISH, reason, set_=fields)

    async def on_import_failed(self, msg: provisioner.MachineImportFailed) -> None:
        """The target made nothing: switch back to the source."""
        doc = await self._at(msg.machine_id, MigrateStep.IMPORT)
        if doc is None or msg.host != _params(doc)["target"]:
            return
        failure = f"import_failed on {msg.host}: {msg.reason}"
        await self._step(doc, MigrateStep.REVERT, f"switching back: {failure}", failure=failure)

    async def on_export_ended(self, msg: provisioner.MachineExportEnded) -> None:
        """The source removed its copy (finish) or runs the machine again (revert)."""
        step = MigrateStep.FINISH if msg.outcome == "moved" else MigrateStep.REVERT
        doc = await self._at(msg.machine_id, step)
        if doc is None or msg.host != _params(doc)["source"]:
            return
        if step == MigrateStep.FINISH:
            # The machine runs on the target either way; leftovers become the source's orphans.
            note = None if msg.ok else f"source_not_cleaned: {msg.reason}"
            await self._end(doc, True, note)
        elif msg.ok:
            await self._end(doc, False, _params(doc).get("failure") or "migrate_failed")
        else:
            await self._unknown(doc, f"switch_back_failed: {msg.reason}")

    async def _end(self, doc: MachineDoc, ok: bool, reason: str | None) -> None:
        """The migration is over: the machine is in the state it had, wherever it is now."""
        d = self._driver
        back = doc.get("state_before_op") or State.RUNNING
        # The code alone ("import_failed"); ``detail`` keeps the whole story.
        why = reason.split(":", 1)[0].split(" ", 1)[0] if reason else None
        await d.move(
            doc, [State.MIGRATING], back, reason=reason, saga=None, ok=ok, why=why,
            detail=reason or "",
        )  # fmt: skip
        log.info("migration ended", machine_id=doc["_id"], ok=ok, reason=reason)

    async def _unknown(self, doc: MachineDoc, reason: str) -> None:
        d = self._driver
        await d.move(
            doc, [State.MIGRATING], State.UNREACHABLE, reason=reason, saga=None, ok=False,
            why=reason.split(":", 1)[0], detail=reason,
            set_={"state_before_unknown": doc.get("state_before_op") or State.RUNNING},
        )  # fmt: skip

    # --- steps that never answered ----------------------------------------------------------

    async def _export_silent(self, doc: MachineDoc, match: SagaMatch) -> None:
        # The source may have stopped the machine before going silent: ask for it back.
        failure = timeout_reason(saga_of(doc))
        await self._step(doc, MigrateStep.REVERT, f"switching back: {failure}", failure=failure)

    async def _import_silent(self, doc: MachineDoc, match: SagaMatch) -> None:
        """Give up on the target: what it may have made goes, the machine goes back."""
        # What the target may have made goes (queued behind its import, by the machine's lock).
        target = {**doc, "host": _params(doc)["target"]}
        await send_action(self._driver.publisher, target, Op.DESTROY)
        failure = timeout_reason(saga_of(doc))
        await self._step(doc, MigrateStep.REVERT, f"switching back: {failure}", failure=failure)

    async def _finish_silent(self, doc: MachineDoc, match: SagaMatch) -> None:
        await self._end(doc, True, f"source_not_cleaned: {timeout_reason(saga_of(doc))}")

    async def _revert_silent(self, doc: MachineDoc, match: SagaMatch) -> None:
        await self._unknown(doc, f"switch_back_unconfirmed: {timeout_reason(saga_of(doc))}")


def _params(doc: MachineDoc) -> dict[str, Any]:
    return dict((doc.get("saga") or {}).get("params") or {})
