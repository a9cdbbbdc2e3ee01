"""The saga driver: every machine operation as steps persisted on the machine's document.

A machine's ``saga`` field holds ``{op, step, attempt, deadline, params}``. Each step sends one
idempotent command (idempotent by machine_id on the receiving side) and waits for its result
event; ``tick`` re-sends a step whose deadline passed, up to ``step_attempts`` times, and then
fails it with compensation (the IP released, any partial container removed). Because the saga
lives in MongoDB, a restarted gateway picks up where the last one stopped (``resume``).

Delivery guarantee: at least once both ways. Commands may be sent more than once (re-sends and
resumes), and result events may arrive twice or late; every transition is conditional on the
state it expects, so a duplicate or late event changes nothing.

Operations and their steps:
- create: ip → place → container (running)
- start/stop/restart: container
- resize: container
- destroy: container → ip (destroyed)
- compensate (after a failed create): container → ip, the machine stays failed
A new operation (a rolling deploy) registers its steps with :meth:`SagaDriver.register_step`
(what to send, how long to wait) and calls :meth:`SagaDriver.advance` from its result handlers;
re-sends, timeouts and resume then work for it unchanged.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import structlog

from libs.common.bus import Publisher, host_key
from libs.common.contracts import gateway as gw
from libs.common.contracts import ipam, provisioner
from libs.common.errors import ConflictError, DomainError, NotFoundError

from .domain import CREATE_TERMINAL, HostView, Ratios, Res, State, can_act, host_status, place
from .domain.states import allowed_from
from .settings import GatewaySettings
from .store import MachineStore, new_machine_id, now

__all__ = ["SagaDriver", "StepSpec", "host_views"]

log = structlog.get_logger("gateway.sagas")

_ACTIONS = {
    "start": (provisioner.ContainerStart, gw.KvmMachineStart),
    "stop": (provisioner.ContainerStop, gw.KvmMachineStop),
    "restart": (provisioner.ContainerRestart, gw.KvmMachineRestart),
    "destroy": (provisioner.ContainerDestroy, gw.KvmMachineDestroy),
}


@dataclass(frozen=True)
class StepSpec:
    """A registered step of an operation: the command it sends and how long to wait."""

    send: Callable[[dict[str, Any]], Awaitable[None]]
    timeout_s: float
    # What a step that never answered leaves behind: the machine's state and a reason.
    on_timeout_state: str | None = None


class Clock(Protocol):
    """Port: the current time (a fake one lets unit tests move it)."""

    def __call__(self) -> datetime:
        """Now, UTC."""
        ...


def host_views(
    hosts: list[dict[str, Any]],
    allocations: dict[str, Res],
    settings: GatewaySettings,
    at: datetime,
) -> list[HostView]:
    """Placement's view of the hosts: liveness from heartbeat age, allocation from our records."""
    views = []
    for h in hosts:
        cap = h.get("capacity") or {}
        labels = h.get("labels") or {}
        age = (at - h["last_seen"]).total_seconds()
        views.append(
            HostView(
                host_id=h["_id"],
                dc=h["dc"],
                status=host_status(age, settings.host_stale_s, settings.host_down_s),
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


class SagaDriver:
    """Starts, advances, re-sends and compensates machine sagas."""

    def __init__(
        self,
        store: MachineStore,
        publisher: Publisher,
        settings: GatewaySettings,
        clock: Clock = now,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self.clock = clock
        # Placement reads allocations then writes one; serialising it in the process keeps two
        # concurrent placements from both taking the last slot of a host.
        self._place_lock = asyncio.Lock()
        self._steps: dict[tuple[str, str], StepSpec] = {}

    def register_step(self, op: str, step: str, spec: StepSpec) -> None:
        """Add a step of a new operation (e.g. ``deploy``/``artifact``)."""
        self._steps[(op, step)] = spec

    async def begin(
        self, machine_id: str, op: str, step: str, from_states: list[str], to_state: str,
        **params: Any,
    ) -> dict[str, Any] | None:
        """Start a registered operation on an idle machine; None if it was not in a from-state."""
        doc = await self._require(machine_id)
        if doc.get("saga"):
            raise ConflictError(f"{machine_id} is busy with {doc['saga']['op']}",
                                reason="machine_busy")
        moved = await self._move(
            doc, from_states, to_state,
            set_={"state_before_op": doc["state"]},
            saga=self.saga(op, step, op_id=secrets.token_hex(6), **params),
        )
        if moved is not None:
            await self.send_step(moved)
        return moved

    async def advance(
        self, machine_id: str, op: str, from_step: str, to_step: str | None,
        *, ok: bool = True, reason: str | None = None,
    ) -> dict[str, Any] | None:
        """Move ``op`` past ``from_step``: to ``to_step`` (and send it), or finish it (None)."""
        doc = await self.store.get(machine_id)
        saga = (doc or {}).get("saga") or {}
        if doc is None or saga.get("op") != op or saga.get("step") != from_step:
            return None
        match = {"saga.op": op, "saga.step": from_step}
        if to_step is None:
            back = doc.get("state_before_op") or doc["state"]
            moved = await self._move(doc, [doc["state"]], back, reason=reason, saga=None)
            if moved is not None:
                await self._finish(doc, ok, reason)
            return moved
        nxt = self.saga(op, to_step, **(saga.get("params") or {}))
        moved = await self.store.update(machine_id, match, {"saga": nxt})
        if moved is not None:
            await self.send_step(moved)
        return moved

    # --- helpers ----------------------------------------------------------------------------

    def _timeout(self, op: str, step: str) -> float:
        if (op, step) in self._steps:
            return self._steps[(op, step)].timeout_s
        s = self.settings
        if step == "ip":
            return s.ip_step_timeout_s
        if op == "create" and step == "container":
            return s.container_step_timeout_s
        if step == "place":
            return s.ip_step_timeout_s
        return s.action_step_timeout_s

    def saga(self, op: str, step: str, attempt: int = 1, **params: Any) -> dict[str, Any]:
        """A saga record for ``op`` at ``step`` with its deadline."""
        deadline = self.clock() + timedelta(seconds=self._timeout(op, step))
        return {"op": op, "step": step, "attempt": attempt, "deadline": deadline, "params": params}

    async def _move(
        self,
        doc_or_id: dict[str, Any] | str,
        from_states: list[str] | set[str] | frozenset[str],
        to_state: str,
        **kw: Any,
    ) -> dict[str, Any] | None:
        mid = doc_or_id if isinstance(doc_or_id, str) else doc_or_id["_id"]
        before = None if isinstance(doc_or_id, str) else doc_or_id.get("state")
        doc = await self.store.transition(mid, [str(s) for s in from_states], to_state, **kw)
        if doc is not None:
            await self.publisher.publish(
                gw.MachineStateChanged(
                    machine_id=mid,
                    app=doc["app"],
                    type=doc["type"],
                    from_state=before,
                    to_state=to_state,
                    reason=doc.get("reason"),
                    host=doc.get("host"),
                    ip=doc.get("ip"),
                    at=self.clock(),
                )
            )
        return doc

    async def _finish(
        self, doc: dict[str, Any], ok: bool, reason: str | None = None, detail: str = ""
    ) -> None:
        """Record how the operation in progress ended (the API's waiters read ``last_op``)."""
        saga = doc.get("saga") or {}
        await self.store.update(
            doc["_id"],
            {},
            {
                "last_op": {
                    "id": (saga.get("params") or {}).get("op_id"),
                    "op": saga.get("op"),
                    "ok": ok,
                    "reason": reason,
                    "detail": detail,
                    "at": self.clock(),
                }
            },
        )

    async def send_step(self, doc: dict[str, Any]) -> None:
        """Send the command of the machine's current saga step."""
        saga = doc["saga"]
        op, step, params = saga["op"], saga["step"], saga.get("params") or {}
        mid, kvm, host = doc["_id"], doc["type"] == "kvm", doc.get("host")
        if (op, step) in self._steps:
            await self._steps[(op, step)].send(doc)
        elif step == "ip" and op == "create":
            await self.publisher.publish(
                ipam.IpAllocate(machine_id=mid, dc=doc["dc"], vlan_id=doc["vlan_id"])
            )
        elif step == "ip":
            await self.publisher.publish(ipam.IpRelease(machine_id=mid))
        elif step == "place":
            await self._place(doc)
        elif op == "create":
            await self._send_create(doc)
        elif op == "resize":
            fields = {k: params.get(k) for k in ("cpus", "memory", "disk")}
            force = bool(params.get("force"))
            if kvm:
                await self.publisher.publish(
                    gw.KvmMachineResize(machine_id=mid, force=force, **fields)
                )
            else:
                await self.publisher.publish(
                    provisioner.ContainerResize(machine_id=mid, force=force, **fields),
                    routing_key=host_key(host, provisioner.ContainerResize.TYPE),
                )
        else:
            action = "destroy" if op in ("destroy", "compensate") else op
            docker_cls, kvm_cls = _ACTIONS[action]
            if kvm:
                await self.publisher.publish(kvm_cls(machine_id=mid))
            elif host:
                await self.publisher.publish(
                    docker_cls(machine_id=mid), routing_key=host_key(host, docker_cls.TYPE)
                )

    async def _send_create(self, doc: dict[str, Any]) -> None:
        common = {
            "machine_id": doc["_id"],
            "app": doc["app"],
            "image": doc["image"],
            "cpus": doc["cpus"],
            "memory": doc["memory"],
            "disk": doc["disk"],
            "ip": doc["ip"],
            "prefix_len": doc["prefix_len"],
            "gateway": doc["gateway"],
            "vlan_id": doc["vlan_id"],
            "hostname": doc["hostname"],
            "ssh_authorized_keys": doc.get("ssh_keys") or [],
        }
        if doc["type"] == "kvm":
            await self.publisher.publish(gw.KvmMachineCreate(dc=doc["dc"], **common))
        else:
            await self.publisher.publish(
                provisioner.ContainerCreate(**common),
                routing_key=host_key(doc["host"], provisioner.ContainerCreate.TYPE),
            )

    # --- create -----------------------------------------------------------------------------

    def new_machine_docs(
        self, spec: dict[str, Any], ids: list[str]
    ) -> list[dict[str, Any]]:
        """The documents of new machines with ``ids``, each with its create saga at step ip."""
        at = self.clock()
        prefix = spec.get("hostname_prefix") or spec["app"]
        # Derived from the ids, so a replayed request sends the same bulk request id.
        request_id = f"r-{ids[0]}" if ids else None
        docs = []
        for mid in ids:
            docs.append(
                {
                    "_id": mid,
                    "type": spec.get("type", "docker"),
                    "app": spec["app"],
                    "image": spec["image"],
                    "cpus": float(spec["cpus"]),
                    "memory": int(spec["memory"]),
                    "disk": int(spec["disk"]),
                    "dc": spec["dc"],
                    "vlan_id": spec["vlan_id"],
                    "hostname": f"{prefix}-{mid[-8:]}",
                    "ssh_keys": list(spec.get("ssh_keys") or []),
                    "state": State.REQUESTED.value,
                    "reason": None,
                    "ip": None,
                    "host": None,
                    "created_at": at,
                    "updated_at": at,
                    "transitions": [{"state": State.REQUESTED.value, "at": at, "reason": None}],
                    "saga": self.saga("create", "ip"),
                    "ip_request": request_id,
                }
            )
        return docs

    @staticmethod
    def new_ids(count: int) -> list[str]:
        """``count`` fresh machine ids."""
        return [new_machine_id() for _ in range(count)]

    async def create(self, spec: dict[str, Any], ids: list[str]) -> list[dict[str, Any]]:
        """Store the machines (existing ids are kept) and start their create sagas."""
        docs = self.new_machine_docs(spec, ids)
        await self.store.insert_machines(docs)
        await self.store.save_app_spec(spec["app"], _app_spec(spec))
        stored = await self.store.by_ids(ids)
        fresh = [
            d for d in stored
            if d["state"] == State.REQUESTED and (d.get("saga") or {}).get("step") == "ip"
        ]
        for doc in fresh:
            await self.publisher.publish(
                gw.MachineRequested(
                    machine_id=doc["_id"],
                    type=doc["type"],
                    app=doc["app"],
                    image=doc["image"],
                    cpus=doc["cpus"],
                    memory=doc["memory"],
                    disk=doc["disk"],
                    dc=doc["dc"],
                    vlan_id=doc["vlan_id"],
                    hostname=doc["hostname"],
                )
            )
        if len(fresh) > 1:
            # One bulk allocation for the request; a re-sent step falls back to ip.allocate.
            await self.publisher.publish(
                ipam.IpAllocateMany(
                    request_id=fresh[0]["ip_request"],
                    machine_ids=[d["_id"] for d in fresh],
                    dc=fresh[0]["dc"],
                    vlan_id=fresh[0]["vlan_id"],
                )
            )
        elif fresh:
            await self.send_step(fresh[0])
        return stored

    async def on_ip_allocated(self, evt: ipam.IpAllocated) -> None:
        """The machine has its IP: place it."""
        await self.on_ip_allocated_many([evt])

    async def on_ip_allocated_many(self, evts: list[ipam.IpAllocated]) -> None:
        """The machines have their IPs: place them in one pass."""
        moved = await asyncio.gather(*(self._assign_ip(e) for e in evts))
        await self._place_batch([d for d in moved if d is not None])

    async def _assign_ip(self, evt: ipam.IpAllocated) -> dict[str, Any] | None:
        doc = await self._move(
            evt.machine_id,
            [State.REQUESTED],
            State.IP_ASSIGNED,
            set_={
                "ip": str(evt.ip),
                "prefix_len": evt.prefix_len,
                "gateway": str(evt.gateway),
                "pool": evt.pool,
            },
            saga=self.saga("create", "place"),
        )
        if doc is not None:
            return doc
        current = await self.store.get(evt.machine_id)
        if current is not None and current["state"] in (
            State.FAILED, State.DESTROYED, State.DESTROYING
        ):
            # The allocation arrived after the machine gave up: release it so it cannot leak.
            await self.publisher.publish(ipam.IpRelease(machine_id=evt.machine_id))
        return None

    async def on_ip_failed(self, evt: ipam.IpAllocationFailed) -> None:
        """No IP: the machine (or every machine of a bulk request) fails; nothing to undo."""
        if evt.machine_id is not None:
            ids = [evt.machine_id]
        elif evt.request_id is not None:
            docs = await self.store.find(
                {"ip_request": evt.request_id, "state": State.REQUESTED.value}, 1000
            )
            ids = [d["_id"] for d in docs]
        else:
            return
        reason = f"{evt.reason}: {evt.detail}" if evt.detail else evt.reason
        for mid in ids:
            doc = await self._move(mid, [State.REQUESTED], State.FAILED, reason=reason, saga=None)
            if doc is not None:
                await self._finish(doc, False, evt.reason, evt.detail)

    async def _place(self, doc: dict[str, Any]) -> None:
        await self._place_batch([doc])

    async def _place_batch(self, docs: list[dict[str, Any]]) -> None:
        docs = [d for d in docs if d["state"] == State.IP_ASSIGNED]
        if not docs:
            return
        placed: list[dict[str, Any] | None] = []
        for d in (d for d in docs if d["type"] == "kvm"):
            placed.append(await self._move(
                d, [State.IP_ASSIGNED], State.PLACED, saga=self.saga("create", "container")
            ))
        containers = [d for d in docs if d["type"] != "kvm"]
        if containers:
            async with self._place_lock:
                at = self.clock()
                hosts = await self.store.list_hosts()
                allocs = {dc: await self.store.allocations(dc)
                          for dc in {d["dc"] for d in containers}}
                counts = {app: await self.store.app_counts(app)
                          for app in {d["app"] for d in containers}}
                decisions = []
                for d in containers:
                    need = Res(d["cpus"], d["memory"], d["disk"])
                    views = host_views(hosts, allocs[d["dc"]], self.settings, at)
                    host = place(views, need, d["dc"], counts[d["app"]])
                    if host is not None:
                        # Later machines of the batch see this one's share.
                        allocs[d["dc"]][host] = allocs[d["dc"]].get(host, Res()) + need
                        counts[d["app"]][host] = counts[d["app"]].get(host, 0) + 1
                    decisions.append((d, host))
                # Written before the lock is released, so the next batch sees them.
                placed += await asyncio.gather(
                    *(self._commit_placement(d, h) for d, h in decisions)
                )
        await asyncio.gather(*(self._start_creating(p) for p in placed if p is not None))

    async def _commit_placement(
        self, doc: dict[str, Any], host: str | None
    ) -> dict[str, Any] | None:
        if host is None:
            failed = await self._move(
                doc,
                [State.IP_ASSIGNED],
                State.FAILED,
                reason="no_capacity",
                saga=self.saga("compensate", "ip"),
            )
            if failed is not None:
                await self._finish(failed, False, "no_capacity")
                await self.send_step(failed)
            return None
        return await self._move(
            doc,
            [State.IP_ASSIGNED],
            State.PLACED,
            set_={"host": host},
            saga=self.saga("create", "container"),
        )

    async def _start_creating(self, placed: dict[str, Any]) -> None:
        creating = await self._move(placed, [State.PLACED], State.CREATING)
        if creating is not None:
            await self.send_step(creating)

    async def on_created(self, machine_id: str, host: str | None, container_id: str | None) -> None:
        """The container (or guest) runs."""
        fields: dict[str, Any] = {"container_id": container_id}
        if host:
            fields["host"] = host
        doc = await self._move(
            machine_id, [State.CREATING, State.PLACED], State.RUNNING, set_=fields, saga=None
        )
        if doc is not None:
            await self._finish(doc, True)
            return
        current = await self.store.get(machine_id)
        if current is not None and current["state"] in (State.FAILED, State.DESTROYED):
            # Created after we gave up on it (a re-sent create that won a race): remove it,
            # or it would run unaccounted for. Destroy is idempotent.
            target = {**current, "host": host or current.get("host")}
            log.warning("late create of a machine we gave up on; destroying it",
                        machine_id=machine_id, host=target["host"])
            await self.send_step({**target, "saga": {"op": "destroy", "step": "container"}})

    async def on_create_failed(self, machine_id: str, reason: str, retriable: bool = False) -> None:
        """The provisioner made nothing: re-send if it may pass, else fail and release the IP."""
        if retriable:
            doc = await self.store.get(machine_id)
            saga = (doc or {}).get("saga") or {}
            if (doc is not None and doc["state"] == State.CREATING
                    and saga.get("op") == "create"
                    and saga.get("attempt", 1) < self.settings.step_attempts):
                match = {"saga.op": "create", "saga.attempt": saga["attempt"]}
                nxt = self.saga("create", "container", saga["attempt"] + 1)
                moved = await self.store.update(machine_id, match, {"saga": nxt})
                if moved is not None:
                    log.info("retriable create failure, re-sent", machine_id=machine_id,
                             reason=reason)
                    await self.send_step(moved)
                return
        doc = await self._move(
            machine_id,
            [State.CREATING, State.PLACED],
            State.FAILED,
            reason=reason,
            saga=self.saga("compensate", "ip"),
        )
        if doc is not None:
            await self._finish(doc, False, reason)
            await self.send_step(doc)

    # --- start / stop / restart / resize ----------------------------------------------------

    async def begin_action(self, machine_id: str, action: str) -> tuple[dict[str, Any], str]:
        """Start a start/stop/restart; return the machine and the operation id."""
        doc = await self._require(machine_id)
        if doc.get("saga"):
            raise ConflictError(
                f"{machine_id} is busy with {doc['saga']['op']}", reason="machine_busy"
            )
        if not can_act(action, doc["state"]):
            raise ConflictError(
                f"cannot {action} a machine in state {doc['state']}", reason="invalid_state"
            )
        op_id = secrets.token_hex(6)
        moved = await self.store.update(
            machine_id,
            {"state": doc["state"], "saga": None},
            {"saga": self.saga(action, "container", op_id=op_id)},
        )
        if moved is None:
            raise ConflictError(f"{machine_id} changed meanwhile; try again", reason="machine_busy")
        await self.send_step(moved)
        return moved, op_id

    async def on_action_done(self, machine_id: str, action: str) -> None:
        """A start/stop/restart took effect."""
        doc = await self.store.get(machine_id)
        if doc is None or (doc.get("saga") or {}).get("op") != action:
            return
        to = State.STOPPED if action == "stop" else State.RUNNING
        moved = await self._move(doc, [doc["state"]], to, saga=None)
        if moved is not None:
            await self._finish(doc, True)

    async def on_action_failed(self, machine_id: str, action: str, reason: str) -> None:
        """A start/stop/restart/destroy failed: the machine keeps its state (destroy: failed)."""
        doc = await self.store.get(machine_id)
        if doc is None or doc.get("saga") is None:
            return
        op = doc["saga"]["op"]
        if action == "destroy" and op == "destroy":
            moved = await self._move(
                doc, [State.DESTROYING], State.FAILED, reason=f"destroy_failed: {reason}", saga=None
            )
            if moved is not None:
                await self._finish(doc, False, reason)
        elif action == op:
            cleared = await self.store.update(
                machine_id, {"saga.op": op}, {"saga": None, "reason": f"{action}_failed: {reason}"}
            )
            if cleared is not None:
                await self._finish(doc, False, reason)

    async def begin_resize(
        self, machine_id: str, cpus: float | None, memory: int | None, disk: int | None, force: bool
    ) -> tuple[dict[str, Any], str]:
        """Start a live resize; a disk shrink is refused at once."""
        doc = await self._require(machine_id)
        if doc.get("saga"):
            raise ConflictError(
                f"{machine_id} is busy with {doc['saga']['op']}", reason="machine_busy"
            )
        if not can_act("resize", doc["state"]):
            raise ConflictError(
                f"cannot resize a machine in state {doc['state']}", reason="invalid_state"
            )
        if disk is not None and disk < doc["disk"]:
            raise ConflictError(
                f"disk cannot shrink ({doc['disk']} → {disk} bytes): XFS cannot shrink",
                reason="disk_shrink",
            )
        op_id = secrets.token_hex(6)
        params = {"cpus": cpus, "memory": memory, "disk": disk, "force": force}
        moved = await self._move(
            doc,
            [doc["state"]],
            State.RESIZING,
            set_={"state_before_resize": doc["state"]},
            saga=self.saga("resize", "container", op_id=op_id, **params),
        )
        if moved is None:
            raise ConflictError(f"{machine_id} changed meanwhile; try again", reason="machine_busy")
        await self.send_step(moved)
        return moved, op_id

    async def on_resized(self, machine_id: str, cpus: float, memory: int, disk: int) -> None:
        """New limits are live."""
        doc = await self.store.get(machine_id)
        if doc is None or doc["state"] != State.RESIZING:
            return
        moved = await self._move(
            doc,
            [State.RESIZING],
            doc.get("state_before_resize") or State.RUNNING,
            set_={"cpus": cpus, "memory": memory, "disk": disk},
            saga=None,
        )
        if moved is not None:
            await self._finish(doc, True)

    async def on_resize_failed(self, machine_id: str, reason: str, detail: str) -> None:
        """The resize was refused; limits unchanged."""
        doc = await self.store.get(machine_id)
        if doc is None or doc["state"] != State.RESIZING:
            return
        moved = await self._move(
            doc,
            [State.RESIZING],
            doc.get("state_before_resize") or State.RUNNING,
            reason=f"resize_failed: {reason}",
            saga=None,
        )
        if moved is not None:
            await self._finish(doc, False, reason, detail)

    # --- destroy ----------------------------------------------------------------------------

    async def begin_destroy(self, machine_id: str) -> dict[str, Any]:
        """Start a destroy: the container (if any), then the IP."""
        doc = await self._require(machine_id)
        if doc["state"] == State.DESTROYED:
            return doc
        if doc["state"] == State.DESTROYING:
            return doc
        if not can_act("destroy", doc["state"]):
            raise ConflictError(
                f"cannot destroy a machine in state {doc['state']}", reason="invalid_state"
            )
        has_target = doc["type"] == "kvm" and doc["state"] not in (
            State.REQUESTED,
            State.IP_ASSIGNED,
        )
        step = "container" if (doc.get("host") or has_target) else "ip"
        if step == "ip" and not _holds_ip(doc):
            done = await self._move(doc, allowed_from("destroy"), State.DESTROYED, saga=None)
            if done is None:
                raise ConflictError(f"{machine_id} changed meanwhile; try again",
                                    reason="machine_busy")
            return done
        moved = await self._move(
            doc,
            allowed_from("destroy"),
            State.DESTROYING,
            saga=self.saga("destroy", step, op_id=secrets.token_hex(6)),
        )
        if moved is None:
            raise ConflictError(f"{machine_id} changed meanwhile; try again", reason="machine_busy")
        await self.send_step(moved)
        return moved

    async def on_destroyed(self, machine_id: str) -> None:
        """The container is gone: release the IP next."""
        doc = await self.store.get(machine_id)
        saga = (doc or {}).get("saga") or {}
        if doc is None or saga.get("step") != "container" or saga.get("op") not in (
            "destroy",
            "compensate",
        ):
            return
        if saga["op"] == "destroy" and not _holds_ip(doc):
            # Its IP was already released (a failed create's compensation): nothing to wait for.
            done = await self._move(doc, [State.DESTROYING], State.DESTROYED, saga=None)
            if done is not None:
                await self._finish(doc, True)
            return
        moved = await self.store.update(
            machine_id,
            {"saga.op": saga["op"], "saga.step": "container"},
            {"saga": self.saga(saga["op"], "ip", **(saga.get("params") or {}))},
        )
        if moved is not None:
            await self.send_step(moved)

    async def on_ip_released(self, machine_id: str) -> None:
        """The IP is cooling down: a destroy is complete, a compensation too."""
        doc = await self.store.get(machine_id)
        if doc is None:
            return
        saga = doc.get("saga") or {}
        if doc["state"] == State.DESTROYING and saga.get("step") == "ip":
            moved = await self._move(
                doc, [State.DESTROYING], State.DESTROYED, set_={"ip_released": True}, saga=None
            )
            if moved is not None:
                await self._finish(doc, True)
        elif saga.get("op") == "compensate" and saga.get("step") == "ip":
            await self.store.update(
                machine_id, {"saga.op": "compensate"}, {"saga": None, "ip_released": True}
            )

    # --- observed state ---------------------------------------------------------------------

    async def on_observed(self, machine_id: str, state: str) -> None:
        """A reconcile or the monitor saw the container: settle an unknown machine."""
        doc = await self.store.get(machine_id)
        if doc is None or doc["state"] != State.UNKNOWN:
            return
        to = State.RUNNING if state == "running" else State.STOPPED
        await self._move(doc, [State.UNKNOWN], to, reason=f"observed {state}")

    async def on_lifecycle(self, machine_id: str, kind: str, reason: str | None = None) -> None:
        """A container started, died or was OOM-killed outside of any saga."""
        doc = await self.store.get(machine_id)
        if doc is None or doc.get("saga"):
            return
        if kind == "started" and doc["state"] in (State.STOPPED, State.UNKNOWN):
            await self._move(doc, [doc["state"]], State.RUNNING, reason="started")
        elif kind in ("died", "oom_killed") and doc["state"] in (State.RUNNING, State.UNKNOWN):
            await self._move(doc, [doc["state"]], State.STOPPED, reason=reason or kind)
        elif kind == "flapping":
            await self.store.update(machine_id, {"saga": None}, {"reason": reason or kind})

    # --- hosts ------------------------------------------------------------------------------

    async def on_heartbeat(self, hb: provisioner.HostHeartbeat) -> None:
        """Record the host; machines marked unknown while it was down come back."""
        at = self.clock()
        await self.store.record_heartbeat(
            {
                "_id": hb.host_id,
                "dc": hb.dc,
                "labels": hb.labels,
                "capacity": hb.capacity.model_dump(exclude={"TYPE"}),
                "reported": hb.allocated.model_dump(exclude={"TYPE"}),
                "machines": hb.machines,
                "images": hb.images,
                "version": hb.version,
                "last_seen": at,
                "status": "online",
            }
        )
        for doc in await self.store.unknown_on_host(hb.host_id):
            await self._move(
                doc,
                [State.UNKNOWN],
                doc.get("state_before_unknown") or State.RUNNING,
                reason="host_back",
            )

    async def check_hosts(self) -> None:
        """Mark the machines of hosts whose heartbeats stopped ``unknown`` (never destroy them)."""
        at = self.clock()
        for h in await self.store.list_hosts():
            age = (at - h["last_seen"]).total_seconds()
            status = host_status(age, self.settings.host_stale_s, self.settings.host_down_s)
            if status == h.get("status"):
                continue
            if not await self.store.set_host_status(h["_id"], h.get("status"), status):
                continue
            if status == "down":
                changed = await self.store.mark_host_unknown(
                    h["_id"], [State.RUNNING, State.STOPPED]
                )
                log.warning("host down", host=h["_id"], machines=len(changed))

    async def announce_known(self) -> None:
        """Tell each live host which machines we hold on it, so it can remove orphans."""
        at = self.clock()
        keep = [*allowed_from("destroy")]
        for h in await self.store.list_hosts():
            age = (at - h["last_seen"]).total_seconds()
            if host_status(age, self.settings.host_stale_s, self.settings.host_down_s) != "online":
                continue
            ids = await self.store.ids_on_host(h["_id"], keep)
            await self.publisher.publish(
                provisioner.MachinesKnown(machine_ids=ids),
                routing_key=host_key(h["_id"], provisioner.MachinesKnown.TYPE),
            )

    async def prewarm(self, dc: str, ref: str) -> int:
        """Ask every live host of ``dc`` to pull ``ref``; return how many were asked."""
        at, asked = self.clock(), 0
        for h in await self.store.list_hosts():
            age = (at - h["last_seen"]).total_seconds()
            status = host_status(age, self.settings.host_stale_s, self.settings.host_down_s)
            if h["dc"] != dc or status == "down":
                continue
            await self.publisher.publish(
                provisioner.ImagePrewarm(ref=ref),
                routing_key=host_key(h["_id"], provisioner.ImagePrewarm.TYPE),
            )
            asked += 1
        return asked

    # --- timeouts and resume ----------------------------------------------------------------

    async def tick(self) -> int:
        """Re-send or fail every step past its deadline; return how many were handled."""
        due = await self.store.due_sagas(self.clock())
        for doc in due:
            try:
                await self._on_due(doc)
            except DomainError as err:
                log.warning("saga step could not be re-sent", machine_id=doc["_id"], error=str(err))
        return len(due)

    async def _on_due(self, doc: dict[str, Any]) -> None:
        saga = doc["saga"]
        match = {"saga.op": saga["op"], "saga.step": saga["step"], "saga.attempt": saga["attempt"]}
        if saga["attempt"] < self.settings.step_attempts:
            nxt = self.saga(saga["op"], saga["step"], saga["attempt"] + 1, **saga.get("params", {}))
            moved = await self.store.update(doc["_id"], match, {"saga": nxt})
            if moved is not None:
                log.info("saga step re-sent", machine_id=doc["_id"], op=saga["op"],
                         step=saga["step"], attempt=nxt["attempt"])
                await self.send_step(moved)
            return
        log.warning("saga step timed out", machine_id=doc["_id"], op=saga["op"], step=saga["step"])
        await self._exhausted(doc, match)

    async def _exhausted(self, doc: dict[str, Any], match: dict[str, Any]) -> None:
        saga = doc["saga"]
        op, step = saga["op"], saga["step"]
        reason = f"timeout: no answer to {op}/{step}"
        if op == "create":
            comp_step = "container" if step == "container" else "ip"
            failed = await self._move(
                doc, [doc["state"]], State.FAILED, reason=reason,
                saga=self.saga("compensate", comp_step),
            )
            if failed is not None:
                await self._finish(doc, False, "timeout")
                await self.send_step(failed)
        elif op in ("start", "stop", "restart"):
            if await self.store.update(doc["_id"], match, {"saga": None, "reason": reason}):
                await self._finish(doc, False, "timeout")
        elif op == "resize":
            back = doc.get("state_before_resize") or State.RUNNING
            if await self._move(doc, [State.RESIZING], back, reason=reason, saga=None):
                await self._finish(doc, False, "timeout")
        elif op == "destroy" and step == "container":
            if await self._move(doc, [State.DESTROYING], State.FAILED, reason=reason, saga=None):
                await self._finish(doc, False, "timeout")
        elif op == "destroy":
            # ipam never confirmed; the machine is gone either way, say so in the reason.
            if await self._move(
                doc, [State.DESTROYING], State.DESTROYED, reason="ip_release_unconfirmed", saga=None
            ):
                await self._finish(doc, True, "ip_release_unconfirmed")
        elif op == "compensate" and step == "container":
            nxt = self.saga("compensate", "ip")
            moved = await self.store.update(doc["_id"], match, {"saga": nxt})
            if moved is not None:
                await self.send_step(moved)
        elif op == "compensate":
            await self.store.update(
                doc["_id"], match, {"saga": None, "ip_release_unconfirmed": True}
            )
        else:
            spec = self._steps.get((op, step))
            back = (spec.on_timeout_state if spec else None) or doc.get("state_before_op")
            if await self._move(doc, [doc["state"]], back or doc["state"], reason=reason,
                                saga=None):
                await self._finish(doc, False, "timeout")

    async def resume(self) -> int:
        """At start: re-send the current step of every saga in flight; return how many."""
        docs = await self.store.in_flight()
        for doc in docs:
            if doc.get("saga") is None:
                continue
            try:
                await self.send_step(doc)
            except DomainError as err:
                log.warning("saga not resumed", machine_id=doc["_id"], error=str(err))
        if docs:
            log.info("sagas resumed", count=len(docs))
        return len(docs)

    # --- queries used by the API ------------------------------------------------------------

    async def _require(self, machine_id: str) -> dict[str, Any]:
        doc = await self.store.get(machine_id)
        if doc is None:
            raise NotFoundError(f"no machine {machine_id}", reason="machine_not_found")
        return doc

    async def wait_terminal(self, ids: list[str], timeout: float) -> list[dict[str, Any]]:
        """Poll until every machine is in a create-terminal state or ``timeout`` passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            docs = await self.store.by_ids(ids)
            if all(d["state"] in CREATE_TERMINAL and not d.get("saga") for d in docs):
                return docs
            if loop.time() >= deadline:
                return docs
            await asyncio.sleep(0.2)

    async def wait_op(self, machine_id: str, op_id: str, timeout: float) -> dict[str, Any] | None:
        """Poll until the operation ``op_id`` ended; return ``last_op`` (None on timeout)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            doc = await self.store.get(machine_id)
            last = (doc or {}).get("last_op") or {}
            if last.get("id") == op_id:
                return last
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(0.1)


def _holds_ip(doc: dict[str, Any]) -> bool:
    """Whether ipam may still hold an IP for the machine (an allocation may be in flight)."""
    if doc.get("ip_released"):
        return False
    return doc.get("ip") is not None or doc["state"] == State.REQUESTED


def _app_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k not in ("count",)}
