"""A machine's life after its create: start, stop, restart, resize, destroy, and what is observed.

Each operation is one saga step on the machine's host (or the KVM channel): ``container``, and
for a destroy then ``ip``. What the monitor and the reconciles observe outside of any saga
(a container died, started, came back) moves an idle machine too.

Delivery guarantee: at least once; every transition is conditional on the state it expects
(see :mod:`.driver`), so duplicate or late results change nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from libs.common.bus import Publisher, host_key
from libs.common.contracts import gateway as gw
from libs.common.contracts import ipam, provisioner
from libs.common.contracts.envelope import Command
from libs.common.errors import ConflictError

from ..documents import MachineDoc
from ..domain import State, can_act
from ..domain.states import UNREACHABLE_NAMES, allowed_from
from .steps import (
    Op,
    SagaMatch,
    Step,
    StepSpec,
    StepTable,
    new_op_id,
    saga_of,
    timeout_reason,
)

if TYPE_CHECKING:
    from .driver import SagaDriver

__all__ = [
    "Lifecycle",
    "LifecycleEvent",
    "ever_ran",
    "holds_ip",
    "send_action",
    "send_ip_release",
]

# The command of each action, to a container's host and to the KVM channel.
_COMMANDS: dict[Op, tuple[type[Command], type[Command]]] = {
    Op.START: (provisioner.ContainerStart, gw.KvmMachineStart),
    Op.STOP: (provisioner.ContainerStop, gw.KvmMachineStop),
    Op.RESTART: (provisioner.ContainerRestart, gw.KvmMachineRestart),
    Op.DESTROY: (provisioner.ContainerDestroy, gw.KvmMachineDestroy),
}
_ACTIONS = (Op.START, Op.STOP, Op.RESTART)


class LifecycleEvent(StrEnum):
    """What the monitor saw happen to a container outside of any saga."""

    STARTED = "started"
    DIED = "died"
    OOM_KILLED = "oom_killed"
    FLAPPING = "flapping"
    # A systemd machine's PID 1 exits 129 on a reboot inside (images/base-systemd) and its
    # restart policy starts it again at once: a restart, not a stop.
    REBOOTED = "rebooted"


# The exit code of a machine's PID 1 that means "rebooted from inside".
REBOOT_EXIT_CODE = 129
# ``lifecycle_at`` of a machine that has had no lifecycle event applied yet.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


async def send_action(publisher: Publisher, doc: MachineDoc, action: Op) -> None:
    """Send ``action`` (start, stop, restart, destroy) to the machine's host or KVM channel."""
    docker_cls, kvm_cls = _COMMANDS[action]
    if doc["type"] == "kvm":
        await publisher.publish(kvm_cls(machine_id=doc["_id"]))
    elif doc.get("host"):
        await publisher.publish(
            docker_cls(machine_id=doc["_id"]), routing_key=host_key(doc["host"], docker_cls.TYPE)
        )


async def send_ip_release(publisher: Publisher, doc: MachineDoc) -> None:
    """Ask ipam to release the machine's IP (at once to the free list if it never ran)."""
    await publisher.publish(ipam.IpRelease(machine_id=doc["_id"], ever_ran=ever_ran(doc)))


# States only a machine that reached running can have been in.
_RAN = frozenset(
    {
        State.RUNNING,
        State.STOPPED,
        State.RESIZING,
        State.DEPLOYING,
        State.MIGRATING,
        *UNREACHABLE_NAMES,
    }
)


def ever_ran(doc: MachineDoc) -> bool:
    """Whether the machine ever reached running: then something out there may know its IP (an
    ARP cache, a known_hosts entry) and the IP cools down before it is given again."""
    if doc.get("container_id") or "transitions" not in doc:
        return True  # a container ran, or a partial read: err on cooling down
    return any(t.get("state") in _RAN for t in doc["transitions"])


def holds_ip(doc: MachineDoc) -> bool:
    """Whether ipam may still hold an IP for the machine (an allocation may be in flight)."""
    if doc.get("ip_released"):
        return False
    return doc.get("ip") is not None or doc["state"] == State.REQUESTED


class Lifecycle:
    """Start, stop, restart, resize and destroy, and the observed changes of idle machines."""

    def __init__(self, driver: SagaDriver) -> None:
        self._driver = driver

    def register(self, table: StepTable) -> None:
        """Add the steps of start, stop, restart, resize and destroy to ``table``."""
        s = self._driver.settings
        ip_s, act_s = s.ip_step_timeout_s, s.action_step_timeout_s
        steps = [
            *(
                (op, Step.CONTAINER, self._send_action, act_s, self._action_timed_out)
                for op in _ACTIONS
            ),
            (Op.RESIZE, Step.CONTAINER, self._send_resize, act_s, self._resize_timed_out),
            (Op.DESTROY, Step.CONTAINER, self._send_destroy, act_s, self._destroy_timed_out),
            (Op.DESTROY, Step.IP, self._send_release, ip_s, self._release_unconfirmed),
        ]
        for op, step, send, timeout_s, on_exhausted in steps:
            table.register(op, step, StepSpec(send, timeout_s, on_exhausted=on_exhausted))

    # --- start / stop / restart -------------------------------------------------------------

    async def begin_action(self, machine_id: str, action: str) -> tuple[MachineDoc, str]:
        """Start a start/stop/restart; return the machine and the operation id."""
        d = self._driver
        doc = await d.require(machine_id, idle=True)
        if not can_act(action, doc["state"]):
            raise ConflictError(
                f"cannot {action} a machine in state {doc['state']}", reason="invalid_state"
            )
        op_id = new_op_id()
        moved = await d.goto(
            machine_id,
            {"state": doc["state"], "saga": None},
            d.saga(Op(action), Step.CONTAINER, op_id=op_id),
        )
        if moved is None:
            raise ConflictError(f"{machine_id} changed meanwhile; try again", reason="machine_busy")
        return moved, op_id

    async def on_action_done(self, machine_id: str, action: str) -> None:
        """A start/stop/restart took effect."""
        d = self._driver
        doc = await d.store.get(machine_id)
        if doc is None or (doc.get("saga") or {}).get("op") != action:
            return
        to = State.STOPPED if action == Op.STOP else State.RUNNING
        await d.move(doc, [doc["state"]], to, saga=None, ok=True)

    async def on_action_failed(self, machine_id: str, action: str, reason: str) -> None:
        """A start/stop/restart/destroy failed: the machine keeps its state (destroy: failed)."""
        d = self._driver
        doc = await d.store.get(machine_id)
        if doc is None or doc.get("saga") is None:
            return
        op = doc["saga"]["op"]
        if action == Op.DESTROY and op == Op.DESTROY:
            await d.move(
                doc,
                [State.DESTROYING],
                State.FAILED,
                reason=f"destroy_failed: {reason}",
                saga=None,
                ok=False,
                why=reason,
            )
        elif action == op:
            # last_op in the same write: a second write could be lost to a crash or a requeue.
            fields = {"saga": None, "reason": f"{action}_failed: {reason}"}
            fields["last_op"] = d.last_op(doc, False, reason)
            await d.store.update(machine_id, {"saga.op": op}, fields)

    async def _send_action(self, doc: MachineDoc) -> None:
        await send_action(self._driver.publisher, doc, Op(saga_of(doc)["op"]))

    async def _action_timed_out(self, doc: MachineDoc, match: SagaMatch) -> None:
        reason = timeout_reason(saga_of(doc))
        last_op = self._driver.last_op(doc, False, "timeout")
        await self._driver.store.update(
            doc["_id"], match, {"saga": None, "reason": reason, "last_op": last_op}
        )

    # --- resize -----------------------------------------------------------------------------

    async def begin_resize(
        self, machine_id: str, cpus: float | None, memory: int | None, disk: int | None, force: bool
    ) -> tuple[MachineDoc, str]:
        """Start a live resize; a disk shrink is refused at once."""
        d = self._driver
        doc = await d.require(machine_id, idle=True)
        if not can_act(Op.RESIZE, doc["state"]):
            raise ConflictError(
                f"cannot resize a machine in state {doc['state']}", reason="invalid_state"
            )
        if disk is not None and disk < doc["disk"]:
            raise ConflictError(
                f"disk cannot shrink ({doc['disk']} → {disk} bytes): XFS cannot shrink",
                reason="disk_shrink",
            )
        op_id = new_op_id()
        params = {"cpus": cpus, "memory": memory, "disk": disk, "force": force}
        moved = await d.move(
            doc,
            [doc["state"]],
            State.RESIZING,
            set_={"state_before_resize": doc["state"]},
            saga=d.saga(Op.RESIZE, Step.CONTAINER, op_id=op_id, **params),
        )
        if moved is None:
            raise ConflictError(f"{machine_id} changed meanwhile; try again", reason="machine_busy")
        await d.send_step(moved)
        return moved, op_id

    async def on_resized(self, machine_id: str, cpus: float, memory: int, disk: int) -> None:
        """New limits are live."""
        d = self._driver
        doc = await d.store.get(machine_id)
        if doc is None or doc["state"] != State.RESIZING:
            return
        await d.move(
            doc,
            [State.RESIZING],
            doc.get("state_before_resize") or State.RUNNING,
            set_={"cpus": cpus, "memory": memory, "disk": disk},
            saga=None,
            ok=True,
        )

    async def on_resize_failed(self, machine_id: str, reason: str, detail: str) -> None:
        """The resize was refused; limits unchanged."""
        d = self._driver
        doc = await d.store.get(machine_id)
        if doc is None or doc["state"] != State.RESIZING:
            return
        await d.move(
            doc,
            [State.RESIZING],
            doc.get("state_before_resize") or State.RUNNING,
            reason=f"resize_failed: {reason}",
            saga=None,
            ok=False,
            why=reason,
            detail=detail,
        )

    async def _send_resize(self, doc: MachineDoc) -> None:
        params = saga_of(doc).get("params") or {}
        fields = {k: params.get(k) for k in ("cpus", "memory", "disk")}
        force = bool(params.get("force"))
        if doc["type"] == "kvm":
            await self._driver.publisher.publish(
                gw.KvmMachineResize(machine_id=doc["_id"], force=force, **fields)
            )
        else:
            await self._driver.publisher.publish(
                provisioner.ContainerResize(machine_id=doc["_id"], force=force, **fields),
                routing_key=host_key(doc["host"], provisioner.ContainerResize.TYPE),
            )

    async def _resize_timed_out(self, doc: MachineDoc, match: SagaMatch) -> None:
        reason = timeout_reason(saga_of(doc))
        back = doc.get("state_before_resize") or State.RUNNING
        d = self._driver
        await d.move(doc, [State.RESIZING], back, reason=reason, saga=None, ok=False, why="timeout")

    # --- destroy ----------------------------------------------------------------------------

    async def begin_destroy(self, machine_id: str) -> MachineDoc:
        """Start a destroy: the container (if any), then the IP."""
        d = self._driver
        doc = await d.require(machine_id)
        if doc["state"] in (State.DESTROYED, State.DESTROYING):
            return doc
        if not can_act(Op.DESTROY, doc["state"]):
            raise ConflictError(
                f"cannot destroy a machine in state {doc['state']}", reason="invalid_state"
            )
        has_target = doc["type"] == "kvm" and doc["state"] not in (
            State.REQUESTED,
            State.IP_ASSIGNED,
        )
        step = Step.CONTAINER if (doc.get("host") or has_target) else Step.IP
        if step == Step.IP and not holds_ip(doc):
            done = await d.move(doc, allowed_from(Op.DESTROY), State.DESTROYED, saga=None)
            if done is None:
                raise ConflictError(
                    f"{machine_id} changed meanwhile; try again", reason="machine_busy"
                )
            return done
        moved = await d.move(
            doc,
            allowed_from(Op.DESTROY),
            State.DESTROYING,
            saga=d.saga(Op.DESTROY, step, op_id=new_op_id()),
        )
        if moved is None:
            raise ConflictError(f"{machine_id} changed meanwhile; try again", reason="machine_busy")
        await d.send_step(moved)
        return moved

    async def on_destroyed(self, machine_id: str) -> None:
        """The container is gone: release the IP next."""
        d = self._driver
        doc = await d.store.get(machine_id)
        saga = (doc or {}).get("saga") or {}
        if (
            doc is None
            or saga.get("step") != Step.CONTAINER
            or saga.get("op")
            not in (
                Op.DESTROY,
                Op.COMPENSATE,
            )
        ):
            return
        if saga["op"] == Op.DESTROY and not holds_ip(doc):
            # Its IP was already released (a failed create's compensation): nothing to wait for.
            await d.move(doc, [State.DESTROYING], State.DESTROYED, saga=None, ok=True)
            return
        await d.goto(
            machine_id,
            {"saga.op": saga["op"], "saga.step": Step.CONTAINER},
            d.saga(saga["op"], Step.IP, **(saga.get("params") or {})),
        )

    async def on_ip_released(self, machine_id: str) -> None:
        """The IP is cooling down: a destroy is complete, a compensation too."""
        d = self._driver
        doc = await d.store.get(machine_id)
        if doc is None:
            return
        saga = doc.get("saga") or {}
        if doc["state"] == State.DESTROYING and saga.get("step") == Step.IP:
            await d.move(
                doc,
                [State.DESTROYING],
                State.DESTROYED,
                set_={"ip_released": True},
                saga=None,
                ok=True,
            )
        elif saga.get("op") == Op.COMPENSATE and saga.get("step") == Step.IP:
            await d.store.update(
                machine_id, {"saga.op": Op.COMPENSATE}, {"saga": None, "ip_released": True}
            )

    async def _send_destroy(self, doc: MachineDoc) -> None:
        await send_action(self._driver.publisher, doc, Op.DESTROY)

    async def _send_release(self, doc: MachineDoc) -> None:
        await send_ip_release(self._driver.publisher, doc)

    async def _destroy_timed_out(self, doc: MachineDoc, match: SagaMatch) -> None:
        reason = timeout_reason(saga_of(doc))
        d = self._driver
        await d.move(
            doc, [State.DESTROYING], State.FAILED, reason=reason, saga=None, ok=False, why="timeout"
        )

    async def _release_unconfirmed(self, doc: MachineDoc, match: SagaMatch) -> None:
        # ipam never confirmed; the machine is gone either way, say so in the reason.
        d = self._driver
        await d.move(
            doc,
            [State.DESTROYING],
            State.DESTROYED,
            reason="ip_release_unconfirmed",
            saga=None,
            ok=True,
            why="ip_release_unconfirmed",
        )

    # --- observed state ---------------------------------------------------------------------

    async def on_observed(self, machine_id: str, state: str) -> None:
        """A reconcile or the monitor saw the container: settle an unreachable machine."""
        doc = await self._driver.store.get(machine_id)
        if doc is None or doc["state"] not in UNREACHABLE_NAMES:
            return
        to = State.RUNNING if state == "running" else State.STOPPED
        await self._driver.move(doc, [doc["state"]], to, reason=f"observed {state}")

    async def on_lifecycle(
        self,
        machine_id: str,
        kind: LifecycleEvent,
        reason: str | None = None,
        at: datetime | None = None,
    ) -> None:
        """A container started, died or was OOM-killed outside of any saga.

        Events of one machine may be handled in any order (the monitor sends a die and the
        start that followed it a few milliseconds apart after a resync, and handlers run
        concurrently), so each is applied only if it is newer than the last one applied: the
        machine keeps ``lifecycle_at``, and every write here is conditional on it. An event
        that changes no state still records its time, so an older one arriving after it is
        dropped.
        """
        d = self._driver
        doc = await d.store.get(machine_id)
        if doc is None or doc.get("saga"):
            return
        newer: dict[str, object] = {}
        stamp: dict[str, object] = {}
        if at is not None:
            if doc.get("lifecycle_at") is None:  # the first event (or a machine older than this)
                await d.store.update(
                    machine_id, {"lifecycle_at": {"$exists": False}}, {"lifecycle_at": EPOCH}
                )
            newer, stamp = {"lifecycle_at": {"$lte": at}}, {"lifecycle_at": at}
        state = doc["state"]
        if kind == LifecycleEvent.STARTED and state in (State.STOPPED, *UNREACHABLE_NAMES):
            await d.move(doc, [state], State.RUNNING, reason="started", set_=stamp, match=newer)
        elif kind in (LifecycleEvent.DIED, LifecycleEvent.OOM_KILLED) and state in (
            State.RUNNING,
            *UNREACHABLE_NAMES,
        ):
            await d.move(
                doc, [state], State.STOPPED, reason=reason or kind, set_=stamp, match=newer
            )
        elif kind == LifecycleEvent.REBOOTED and state == State.RUNNING:
            await d.store.update(
                machine_id,
                {"state": State.RUNNING, "saga": None, **newer},
                {"reason": reason or kind, **stamp},
            )
        elif kind == LifecycleEvent.FLAPPING:
            await d.store.update(machine_id, {"saga": None}, {"reason": reason or kind})
        elif stamp:
            await d.store.update(machine_id, {"state": state, "saga": None, **newer}, stamp)
