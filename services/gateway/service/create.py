"""The create saga: ip → place → container, and its compensation when a step fails.

A machine is stored ``requested`` with its saga at ``ip``. When ipam answers (for a whole batch
at once), the batch is placed in one pass over one read of the hosts and the dc's load, and each
machine is written once: on to ``creating`` through ``ip_assigned`` and ``placed`` (recorded in
its history and announced; a KVM guest gets no host: its hypervisor places it), and its create
command is sent. The host's ``container.created`` ends the saga ``running``. A batch fails as a
whole (``no_capacity``, each IP released, no container made) only when the dc cannot hold it
all. A failure after the IP was given moves the machine ``failed`` and starts ``compensate``:
remove any partial container, then release the IP.

Delivery guarantee: at least once; every transition is conditional on the state it expects
(see :mod:`.driver`), so duplicate or late results change nothing, and an IP or a container that
arrives after the machine gave up is released or destroyed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog

from libs.common.bus import host_key
from libs.common.contracts import gateway as gw
from libs.common.contracts import ipam, provisioner
from libs.common.errors import ConflictError

from ..documents import MachineDoc, SagaRecord
from ..domain import Res, State, place_all, place_prefix
from ..store import new_machine_id
from .hosts import host_views
from .lifecycle import send_action, send_ip_release
from .steps import Op, SagaMatch, Step, StepSpec, StepTable, saga_of, timeout_reason

if TYPE_CHECKING:
    from .driver import SagaDriver

__all__ = ["CreateSaga"]

log = structlog.get_logger("gateway.sagas")


class CreateSaga:
    """Creates machines, and compensates a create that failed part way."""

    def __init__(self, driver: SagaDriver) -> None:
        self._driver = driver
        # Placement reads the dc's load then writes its machines; serialising it in the process
        # keeps two concurrent batches from both taking the last slot of a host.
        self._place_lock = asyncio.Lock()

    def register(self, table: StepTable) -> None:
        """Add the steps of create and compensate to ``table``."""
        s = self._driver.settings
        ip_s, create_s, act_s = (
            s.ip_step_timeout_s,
            s.container_step_timeout_s,
            s.action_step_timeout_s,
        )
        give_up_ip, give_up_container = self._giving_up(Step.IP), self._giving_up(Step.CONTAINER)
        steps = (
            (Op.CREATE, Step.IP, self._send_allocate, ip_s, give_up_ip),
            (Op.CREATE, Step.PLACE, self._send_place, ip_s, give_up_ip),
            (Op.CREATE, Step.CONTAINER, self._send_create, create_s, give_up_container),
            (Op.COMPENSATE, Step.CONTAINER, self._send_destroy, act_s, self._skip_to_release),
            (Op.COMPENSATE, Step.IP, self._send_release, ip_s, self._release_unconfirmed),
        )
        for op, step, send, timeout_s, on_exhausted in steps:
            table.register(op, step, StepSpec(send, timeout_s, on_exhausted=on_exhausted))

    # --- request ----------------------------------------------------------------------------

    @staticmethod
    def new_ids(count: int) -> list[str]:
        """``count`` fresh machine ids."""
        return [new_machine_id() for _ in range(count)]

    def new_machine_docs(self, spec: dict[str, Any], ids: list[str]) -> list[MachineDoc]:
        """The documents of new machines with ``ids``, each with its create saga at step ip."""
        at = self._driver.clock()
        # Derived from the ids, so a replayed request sends the same bulk request id.
        request_id = f"r-{ids[0]}" if ids else None
        saga = self._driver.saga(Op.CREATE, Step.IP)
        return [_machine_doc(spec, mid, at, request_id, saga) for mid in ids]

    async def create(self, spec: dict[str, Any], ids: list[str]) -> list[MachineDoc]:
        """Store the machines (existing ids are kept) and start their create sagas."""
        d = self._driver
        await d.store.insert_machines(self.new_machine_docs(spec, ids))
        await d.store.save_app_spec(spec["app"], {k: v for k, v in spec.items() if k != "count"})
        stored = await d.store.by_ids(ids)
        fresh = [
            m
            for m in stored
            if m["state"] == State.REQUESTED and (m.get("saga") or {}).get("step") == Step.IP
        ]
        for doc in fresh:
            await d.publisher.publish(_requested(doc))
        if len(fresh) > 1:
            # One bulk allocation for the request; a re-sent step falls back to ip.allocate.
            await d.publisher.publish(
                ipam.IpAllocateMany(
                    request_id=fresh[0]["ip_request"],
                    machine_ids=[m["_id"] for m in fresh],
                    dc=fresh[0]["dc"],
                    vlan_id=fresh[0]["vlan_id"],
                )
            )
        elif fresh:
            await d.send_step(fresh[0])
        return stored

    # --- ip and placement ---------------------------------------------------------------------

    async def on_ip_allocated(self, evt: ipam.IpAllocated) -> None:
        """The machine has its IP: place it."""
        await self.on_ip_allocated_many([evt])

    async def on_ip_allocated_many(self, evts: list[ipam.IpAllocated]) -> None:
        """The machines have their IPs: place them in one pass, writing each machine once."""
        d = self._driver
        docs = {m["_id"]: m for m in await d.store.by_ids([e.machine_id for e in evts])}
        batch: list[tuple[MachineDoc, dict[str, Any]]] = []
        for evt in evts:
            doc = docs.get(evt.machine_id)
            if doc is not None and doc["state"] == State.REQUESTED:
                batch.append((doc, _ip_fields(evt)))
            elif doc is not None and doc["state"] in _GAVE_UP:
                # The allocation arrived after the machine gave up: release it so it cannot leak.
                await send_ip_release(d.publisher, doc)
        await self._place(batch)

    async def on_ip_failed(self, evt: ipam.IpAllocationFailed) -> None:
        """No IP: the machine (or every machine of a bulk request) fails; nothing to undo."""
        d = self._driver
        if evt.machine_id is not None:
            ids = [evt.machine_id]
        elif evt.request_id is not None:
            docs = await d.store.find(
                {"ip_request": evt.request_id, "state": State.REQUESTED.value}, 1000
            )
            ids = [m["_id"] for m in docs]
        else:
            return
        reason = f"{evt.reason}: {evt.detail}" if evt.detail else evt.reason
        for mid in ids:
            await d.move(
                mid,
                [State.REQUESTED],
                State.FAILED,
                reason=reason,
                saga=None,
                ok=False,
                why=evt.reason,
                detail=evt.detail,
            )

    async def _send_allocate(self, doc: MachineDoc) -> None:
        await self._driver.publisher.publish(
            ipam.IpAllocate(machine_id=doc["_id"], dc=doc["dc"], vlan_id=doc["vlan_id"])
        )

    async def _send_place(self, doc: MachineDoc) -> None:
        # Placement is the gateway's own step: "sending" it is doing it (a machine stored
        # ip_assigned by an older gateway, resumed or re-sent).
        if doc["state"] == State.IP_ASSIGNED:
            await self._place([(doc, {})])

    async def _place(self, batch: list[tuple[MachineDoc, dict[str, Any]]]) -> None:
        """Place the machines in one pass over one read of hosts and load, write each once
        (on to creating, or failed when the dc cannot hold the batch), then send their steps."""
        if not batch:
            return
        async with self._place_lock:
            hosts = await self._decide([m for m, _ in batch if m["type"] != "kvm"])
            # Written before the lock is released, so the next batch sees them.
            written = await asyncio.gather(
                *(self._commit(m, ip, hosts.get(m["_id"])) for m, ip in batch),
                return_exceptions=True,
            )
        error = next((w for w in written if isinstance(w, BaseException)), None)
        await asyncio.gather(
            *(
                self._after_commit(m, ip, w)
                for (m, ip), w in zip(batch, written, strict=True)
                if not isinstance(w, BaseException)
            )
        )
        if error is not None:
            # The machines written are on their way; a redelivery places the others.
            raise error

    async def _decide(self, docs: list[MachineDoc]) -> dict[str, str | None]:
        """A host for each container (None for every one of a dc that cannot hold them all);
        called under the place lock."""
        if not docs:
            return {}
        d = self._driver
        at = d.clock()
        hosts = await d.store.list_hosts()
        drained = await d.store.drains.drained()
        out: dict[str, str | None] = {}
        for dc in sorted({m["dc"] for m in docs}):
            in_dc = [m for m in docs if m["dc"] == dc]
            load = await d.store.load(dc)
            views = host_views(hosts, load.allocated, d.settings, at, drained)
            needs = [(m["app"], _need(m)) for m in in_dc]
            chosen = place_all(views, needs, dc, load) or [None] * len(in_dc)
            out.update((m["_id"], host) for m, host in zip(in_dc, chosen, strict=True))
        return out

    async def check_fits(self, spec: dict[str, Any], count: int) -> None:
        """Refuse (409 ``no_capacity``) before anything is stored a batch of containers that
        the dc's placeable hosts cannot hold beside what they hold and what is on its way to
        them (machines not placed yet). Placement decides again once the IPs arrive: a batch
        that another took the room of between the two still fails whole there."""
        if spec.get("type", "docker") == "kvm" or count < 1:
            return
        d, dc = self._driver, spec["dc"]
        pending = [
            m
            for state in (State.REQUESTED, State.IP_ASSIGNED)
            # Summaries: small, and served from memory once the list's index is loaded.
            for m in await d.store.summaries({"dc": dc, "state": state.value}, 10_000)
            if m["type"] != "kvm"
        ]
        load = await d.store.load(dc)
        views = host_views(
            await d.store.list_hosts(),
            load.allocated,
            d.settings,
            d.clock(),
            await d.store.drains.drained(),
        )
        needs = [(m["app"], _need(m)) for m in pending] + [(spec["app"], _need(spec))] * count
        placed = place_prefix(views, needs, dc, load)
        if len(placed) == len(needs):
            return
        room = max(0, len(placed) - len(pending))
        usable = sum(1 for v in views if v.dc == dc and v.status == "online")
        raise ConflictError(
            f"dc {dc} cannot hold {count} more machines of {spec['cpus']:g} cpus, "
            f"{int(spec['memory']) >> 20} MiB of memory and {int(spec['disk']) >> 20} MiB of "
            f"disk: its {usable} placeable hosts (online, not drained) have room for {room}",
            reason="no_capacity",
        )

    async def _commit(
        self, doc: MachineDoc, ip: dict[str, Any], host: str | None
    ) -> tuple[MachineDoc, list[str]] | None:
        """The one write of a placement: on to creating (with its IP and host), or failed with
        its IP to release; the written document and the states it went through."""
        d = self._driver
        before = doc["state"]
        fails = host is None and doc["type"] != "kvm"
        to = State.FAILED if fails else State.CREATING
        via = _path_to(before, to)
        if fails:
            set_ = {**ip, "last_op": d.last_op(doc, False, "no_capacity")}
            saga = d.saga(Op.COMPENSATE, Step.IP)
        else:
            set_ = {**ip, **({"host": host} if host else {})}
            saga = d.saga(Op.CREATE, Step.CONTAINER)
        reason = "no_capacity" if fails else None
        # Its events ride in the same write (the outbox), published after it.
        events = d.state_events({**doc, "reason": reason, **set_}, [before, *via, to])
        moved = await d.store.transition(
            doc["_id"], [before], to, via=via, reason=reason, set_=set_, saga=saga, outbox=events
        )
        return None if moved is None else (moved, [before, *via, to])

    async def _after_commit(
        self, doc: MachineDoc, ip: dict[str, Any], written: tuple[MachineDoc, list[str]] | None
    ) -> None:
        """Announce a placement and send its next step (create, or release of the IP)."""
        d = self._driver
        if written is None:
            current = await d.store.get(doc["_id"])
            if ip and current is not None and current["state"] in _GAVE_UP:
                # It gave up between our read and our write: release the IP it was given.
                await send_ip_release(d.publisher, current)
            return
        moved, _ = written
        await d.publish_outbox(moved)
        await d.send_step(moved)

    # --- container --------------------------------------------------------------------------

    async def on_created(self, machine_id: str, host: str | None, container_id: str | None) -> None:
        """The container (or guest) runs."""
        d = self._driver
        fields: dict[str, Any] = {"container_id": container_id}
        if host:
            fields["host"] = host
        running = [State.CREATING, State.PLACED]
        doc = await d.move(machine_id, running, State.RUNNING, set_=fields, saga=None, ok=True)
        if doc is not None:
            return
        current = await d.store.get(machine_id)
        if current is not None and current["state"] in (State.FAILED, State.DESTROYED):
            # Created after we gave up on it (a re-sent create that won a race): remove it,
            # or it would run unaccounted for. Destroy is idempotent.
            target: MachineDoc = {**current, "host": host or current.get("host")}
            log.warning(
                "late create of a machine we gave up on; destroying it",
                machine_id=machine_id,
                host=target["host"],
            )
            await send_action(d.publisher, target, Op.DESTROY)

    async def on_create_failed(self, machine_id: str, reason: str, retriable: bool = False) -> None:
        """The provisioner made nothing: re-send if it may pass, else fail and release the IP."""
        d = self._driver
        if retriable:
            doc = await d.store.get(machine_id)
            saga = (doc or {}).get("saga") or {}
            if (
                doc is not None
                and doc["state"] == State.CREATING
                and saga.get("op") == Op.CREATE
                and saga.get("attempt", 1) < d.settings.step_attempts
            ):
                log.info(
                    "retriable create failure, re-sending", machine_id=machine_id, reason=reason
                )
                await d.goto(
                    machine_id,
                    {"saga.op": Op.CREATE, "saga.attempt": saga["attempt"]},
                    d.saga(Op.CREATE, Step.CONTAINER, saga["attempt"] + 1),
                )
                return
        doc = await d.move(
            machine_id,
            [State.CREATING, State.PLACED],
            State.FAILED,
            reason=reason,
            saga=d.saga(Op.COMPENSATE, Step.IP),
            ok=False,
            why=reason,
        )
        if doc is not None:
            await d.send_step(doc)

    async def _send_create(self, doc: MachineDoc) -> None:
        if doc["type"] == "kvm":
            await self._driver.publisher.publish(gw.KvmMachineCreate(dc=doc["dc"], **_spec(doc)))
        else:
            await self._driver.publisher.publish(
                provisioner.ContainerCreate(
                    **_spec(doc), direct_ssh=bool(doc.get("direct_ssh")), init=doc.get("init")
                ),
                routing_key=host_key(doc["host"], provisioner.ContainerCreate.TYPE),
            )

    # --- compensation -----------------------------------------------------------------------

    def _giving_up(self, from_step: Step) -> Callable[[MachineDoc, SagaMatch], Awaitable[None]]:
        """What a create step that never answered does: fail the machine and compensate (a
        partial container may exist only once the container step was sent)."""
        first = Step.CONTAINER if from_step == Step.CONTAINER else Step.IP

        async def give_up(doc: MachineDoc, match: SagaMatch) -> None:
            reason = timeout_reason(saga_of(doc))
            d = self._driver
            failed = await d.move(
                doc,
                [doc["state"]],
                State.FAILED,
                reason=reason,
                saga=d.saga(Op.COMPENSATE, first),
                ok=False,
                why="timeout",
            )
            if failed is not None:
                await d.send_step(failed)

        return give_up

    async def _send_destroy(self, doc: MachineDoc) -> None:
        await send_action(self._driver.publisher, doc, Op.DESTROY)

    async def _send_release(self, doc: MachineDoc) -> None:
        await send_ip_release(self._driver.publisher, doc)

    async def _skip_to_release(self, doc: MachineDoc, match: SagaMatch) -> None:
        await self._driver.goto(doc["_id"], match, self._driver.saga(Op.COMPENSATE, Step.IP))

    async def _release_unconfirmed(self, doc: MachineDoc, match: SagaMatch) -> None:
        await self._driver.store.update(
            doc["_id"], match, {"saga": None, "ip_release_unconfirmed": True}
        )


def _machine_doc(
    spec: dict[str, Any], mid: str, at: datetime, request_id: str | None, saga: SagaRecord
) -> MachineDoc:
    """A new machine of ``spec``, requested at ``at``."""
    prefix = spec.get("hostname_prefix") or spec["app"]
    return {
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
        "direct_ssh": bool(spec.get("direct_ssh")),
        **({"init": spec["init"]} if spec.get("init") else {}),
        "state": State.REQUESTED.value,
        "reason": None,
        "ip": None,
        "host": None,
        "created_at": at,
        "updated_at": at,
        "transitions": [{"state": State.REQUESTED.value, "at": at, "reason": None}],
        "saga": saga,
        "ip_request": request_id,
    }


# States in which a machine no longer wants the IP it is given.
_GAVE_UP = frozenset({State.FAILED, State.DESTROYED, State.DESTROYING})
# The create saga's states up to the container step.
_CREATE_PATH = (State.REQUESTED, State.IP_ASSIGNED, State.PLACED, State.CREATING)


def _path_to(before: str, to: State) -> list[str]:
    """The states passed through from ``before`` to ``to`` (creating, or failed once the IP is
    given), both excluded."""
    walked = _CREATE_PATH[_CREATE_PATH.index(State(before)) + 1 :]
    if to == State.FAILED:
        walked = tuple(s for s in walked if s == State.IP_ASSIGNED)
    return [s.value for s in walked if s != to]


def _need(m: MachineDoc | dict[str, Any]) -> Res:
    """What a machine (or a create spec) asks of its host."""
    return Res(float(m["cpus"]), int(m["memory"]), int(m["disk"]))


def _ip_fields(evt: ipam.IpAllocated) -> dict[str, Any]:
    """What a machine records of its allocation."""
    return {
        "ip": str(evt.ip),
        "prefix_len": evt.prefix_len,
        "gateway": str(evt.gateway),
        "pool": evt.pool,
    }


def _requested(doc: MachineDoc) -> gw.MachineRequested:
    """The announcement of a new machine."""
    return gw.MachineRequested(
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


def _spec(doc: MachineDoc) -> dict[str, Any]:
    """What a create command carries, to a host or to the KVM channel."""
    return {
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
