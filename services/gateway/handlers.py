"""Bus entrypoints of the gateway: each event it consumes, handed to the use-case layer.

The two tables, :data:`MACHINE_EVENTS` and :data:`RELEASE_EVENTS`, are the only declaration:
the handlers of each queue and the queue's bindings are derived from them.

Delivery guarantee: at least once. Every saga method is conditional on the machine's current
state (the machine id is the natural key), a release request is idempotent by release_id and a
deploy result by the machine's status in the release, so a redelivered or duplicated event
changes nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

from libs.common.bus import Handler, MessageContext
from libs.common.contracts import gateway as gw
from libs.common.contracts import imagesync, ipam, monitor, provisioner
from libs.common.contracts.envelope import Message
from libs.common.contracts.releases import (
    DeployFailed,
    DeploySucceeded,
    ReleaseFailed,
    ReleaseRequested,
)
from libs.common.errors import DomainError

from .service import Releases, SagaDriver, bastion_audit
from .service.hosts import HostReports
from .service.lifecycle import REBOOT_EXIT_CODE, LifecycleEvent
from .store import GatewayStore

__all__ = [
    "BASTION_BINDINGS",
    "BASTION_QUEUE",
    "BINDINGS",
    "MACHINE_EVENTS",
    "ORPHAN_BINDINGS",
    "ORPHAN_EVENTS",
    "ORPHAN_QUEUE",
    "QUEUE",
    "RELEASE_BINDINGS",
    "RELEASE_EVENTS",
    "RELEASE_QUEUE",
    "bastion_handlers",
    "build_handlers",
    "orphan_handlers",
    "release_handlers",
]

# --- machines: results of the sagas' commands, heartbeats, what the monitor saw --------------


async def _ip_allocated(d: SagaDriver, msg: ipam.IpAllocated, ctx: MessageContext) -> None:
    await d.creates.on_ip_allocated(msg)


async def _ip_allocated_many(d: SagaDriver, msg: ipam.IpAllocatedMany, ctx: MessageContext) -> None:
    await d.creates.on_ip_allocated_many(list(msg.allocations))


async def _ip_failed(d: SagaDriver, msg: ipam.IpAllocationFailed, ctx: MessageContext) -> None:
    await d.creates.on_ip_failed(msg)


async def _ip_released(d: SagaDriver, msg: ipam.IpReleased, ctx: MessageContext) -> None:
    await d.lifecycle.on_ip_released(msg.machine_id)


async def _created(d: SagaDriver, msg: provisioner.ContainerCreated, ctx: MessageContext) -> None:
    await d.creates.on_created(msg.machine_id, msg.host, msg.container_id)


async def _kvm_created(d: SagaDriver, msg: gw.KvmMachineCreated, ctx: MessageContext) -> None:
    await d.creates.on_created(msg.machine_id, msg.host, None)


async def _create_failed(
    d: SagaDriver, msg: provisioner.ContainerCreateFailed, ctx: MessageContext
) -> None:
    await d.creates.on_create_failed(msg.machine_id, msg.reason, msg.retriable)


async def _kvm_create_failed(
    d: SagaDriver, msg: gw.KvmMachineCreateFailed, ctx: MessageContext
) -> None:
    await d.creates.on_create_failed(msg.machine_id, msg.reason)


async def _action_done(
    d: SagaDriver, msg: provisioner.ContainerActionDone | gw.KvmActionDone, ctx: MessageContext
) -> None:
    await d.lifecycle.on_action_done(msg.machine_id, msg.action)


async def _action_failed(
    d: SagaDriver,
    msg: provisioner.ContainerActionFailed | gw.KvmActionFailed,
    ctx: MessageContext,
) -> None:
    await d.lifecycle.on_action_failed(msg.machine_id, msg.action, msg.reason)


async def _destroyed(
    d: SagaDriver,
    msg: provisioner.ContainerDestroyed | gw.KvmMachineDestroyed,
    ctx: MessageContext,
) -> None:
    await d.lifecycle.on_destroyed(msg.machine_id)


async def _resized(
    d: SagaDriver, msg: provisioner.ContainerResized | gw.KvmMachineResized, ctx: MessageContext
) -> None:
    await d.lifecycle.on_resized(msg.machine_id, msg.cpus, msg.memory, msg.disk)


async def _resize_failed(
    d: SagaDriver,
    msg: provisioner.ContainerResizeFailed | gw.KvmMachineResizeFailed,
    ctx: MessageContext,
) -> None:
    await d.lifecycle.on_resize_failed(msg.machine_id, msg.reason, msg.detail)


async def _observed(d: SagaDriver, msg: provisioner.ContainerObserved, ctx: MessageContext) -> None:
    await d.lifecycle.on_observed(msg.machine_id, msg.state)


async def _started(d: SagaDriver, msg: monitor.ContainerStarted, ctx: MessageContext) -> None:
    await d.lifecycle.on_lifecycle(msg.machine_id, LifecycleEvent.STARTED, at=msg.at)


async def _died(d: SagaDriver, msg: monitor.ContainerDied, ctx: MessageContext) -> None:
    kind = LifecycleEvent.OOM_KILLED if msg.oom_killed else LifecycleEvent.DIED
    if kind == LifecycleEvent.DIED and msg.exit_code == REBOOT_EXIT_CODE:
        kind = LifecycleEvent.REBOOTED
    await d.lifecycle.on_lifecycle(
        msg.machine_id, kind, f"{kind} (exit {msg.exit_code})", at=msg.at
    )


async def _flapping(d: SagaDriver, msg: monitor.ContainerFlapping, ctx: MessageContext) -> None:
    await d.lifecycle.on_lifecycle(
        msg.machine_id,
        LifecycleEvent.FLAPPING,
        f"flapping: {msg.restarts} restarts in {msg.window_s}s",
    )


async def _heartbeat(d: SagaDriver, msg: provisioner.HostHeartbeat, ctx: MessageContext) -> None:
    await d.hosts.on_heartbeat(msg)


async def _replicated(d: SagaDriver, msg: imagesync.ImageReplicated, ctx: MessageContext) -> None:
    ref = msg.ref or f"{msg.registry}/{msg.repo}:{msg.tag}"
    await d.hosts.on_image_arrived(msg.dc, ref)


async def _pushed(d: SagaDriver, msg: imagesync.ImagePushed, ctx: MessageContext) -> None:
    # A push to a dc's own registry prewarms its hosts as a replication into it does.
    if msg.tag:
        await d.hosts.on_image_arrived(msg.dc, f"{msg.registry}/{msg.repo}:{msg.tag}")


async def _exported(d: SagaDriver, msg: provisioner.MachineExported, ctx: MessageContext) -> None:
    await d.migrations.on_exported(msg)


async def _export_failed(
    d: SagaDriver, msg: provisioner.MachineExportFailed, ctx: MessageContext
) -> None:
    await d.migrations.on_export_failed(msg)


async def _imported(d: SagaDriver, msg: provisioner.MachineImported, ctx: MessageContext) -> None:
    await d.migrations.on_imported(msg)


async def _import_failed(
    d: SagaDriver, msg: provisioner.MachineImportFailed, ctx: MessageContext
) -> None:
    await d.migrations.on_import_failed(msg)


async def _export_ended(
    d: SagaDriver, msg: provisioner.MachineExportEnded, ctx: MessageContext
) -> None:
    await d.migrations.on_export_ended(msg)


# What each consumed event does. Exact event types only: a pattern like ``kvm.#`` would also
# bind our own commands.
MACHINE_EVENTS: Mapping[type[Message], Callable[[SagaDriver, Any, MessageContext], Awaitable[None]]]
MACHINE_EVENTS = {
    imagesync.ImageReplicated: _replicated,
    imagesync.ImagePushed: _pushed,
    monitor.ContainerStarted: _started,
    monitor.ContainerDied: _died,
    monitor.ContainerFlapping: _flapping,
    ipam.IpAllocated: _ip_allocated,
    ipam.IpAllocatedMany: _ip_allocated_many,
    ipam.IpAllocationFailed: _ip_failed,
    ipam.IpReleased: _ip_released,
    provisioner.ContainerCreated: _created,
    provisioner.ContainerCreateFailed: _create_failed,
    provisioner.ContainerActionDone: _action_done,
    provisioner.ContainerActionFailed: _action_failed,
    provisioner.ContainerDestroyed: _destroyed,
    provisioner.ContainerResized: _resized,
    provisioner.ContainerResizeFailed: _resize_failed,
    provisioner.HostHeartbeat: _heartbeat,
    provisioner.ContainerObserved: _observed,
    provisioner.MachineExported: _exported,
    provisioner.MachineExportFailed: _export_failed,
    provisioner.MachineImported: _imported,
    provisioner.MachineImportFailed: _import_failed,
    provisioner.MachineExportEnded: _export_ended,
    gw.KvmMachineCreated: _kvm_created,
    gw.KvmMachineCreateFailed: _kvm_create_failed,
    gw.KvmActionDone: _action_done,
    gw.KvmActionFailed: _action_failed,
    gw.KvmMachineResized: _resized,
    gw.KvmMachineResizeFailed: _resize_failed,
    gw.KvmMachineDestroyed: _destroyed,
}
QUEUE = "gateway"
BINDINGS = tuple(event.TYPE for event in MACHINE_EVENTS)


def build_handlers(driver: SagaDriver) -> dict[str, Handler]:
    """The handler of every machine event the gateway consumes, bound to ``driver``."""
    return {event.TYPE: partial(act, driver) for event, act in MACHINE_EVENTS.items()}


# --- releases: the release system's requests and the hosts' deploy results --------------------


async def _release_requested(
    releases: Releases, msg: ReleaseRequested, ctx: MessageContext
) -> None:
    try:
        await releases.request(msg, requested_by=ctx.envelope.source)
    except DomainError as err:
        # The release system hears back on its own channel rather than from a DLQ.
        await ctx.publish(
            ReleaseFailed(
                release_id=msg.release_id,
                app=msg.app,
                version=msg.version,
                reason=f"{err.reason}: {err}",
            )
        )


async def _deploy_result(
    releases: Releases, msg: DeploySucceeded | DeployFailed, ctx: MessageContext
) -> None:
    await releases.on_result(msg)


RELEASE_EVENTS: Mapping[type[Message], Callable[[Releases, Any, MessageContext], Awaitable[None]]]
RELEASE_EVENTS = {
    ReleaseRequested: _release_requested,
    DeploySucceeded: _deploy_result,
    DeployFailed: _deploy_result,
}
RELEASE_QUEUE = "gateway.releases"
RELEASE_BINDINGS = tuple(event.TYPE for event in RELEASE_EVENTS)


def release_handlers(releases: Releases) -> dict[str, Handler]:
    """The handler of every release event the gateway consumes, bound to ``releases``."""
    return {event.TYPE: partial(act, releases) for event, act in RELEASE_EVENTS.items()}


# --- the bastion: its sessions, transfers and refusals, into the audit log --------------------


async def _bastion_audit(store: GatewayStore, msg: Message, ctx: MessageContext) -> None:
    await bastion_audit.record(store, msg, ctx.envelope)


BASTION_QUEUE = "gateway.bastion"
BASTION_BINDINGS = tuple(event.TYPE for event in bastion_audit.AUDITED_EVENTS)


def bastion_handlers(store: GatewayStore) -> dict[str, Handler]:
    """The handler of every bastion event the gateway audits (each written once)."""
    return {kind: partial(_bastion_audit, store) for kind in BASTION_BINDINGS}


# --- orphans: what hosts report of the machines they quarantined, and their alerts -------------


async def _quarantined(
    r: HostReports, msg: provisioner.ContainerQuarantined, ctx: MessageContext
) -> None:
    await r.on_quarantined(msg)


async def _unquarantined(
    r: HostReports, msg: provisioner.ContainerUnquarantined, ctx: MessageContext
) -> None:
    await r.on_ended(msg.host, msg.machine_id, "released", ctx.envelope.occurred_at)


async def _orphan_destroyed(
    r: HostReports, msg: provisioner.ContainerDestroyed, ctx: MessageContext
) -> None:
    if msg.reason == "orphan":
        await r.on_ended(msg.host, msg.machine_id, "purged", ctx.envelope.occurred_at)


async def _host_alert(r: HostReports, msg: provisioner.HostAlert, ctx: MessageContext) -> None:
    await r.on_alert(msg)


# A queue of its own: container.destroyed also reaches the machine sagas' queue.
ORPHAN_EVENTS: Mapping[type[Message], Callable[[HostReports, Any, MessageContext], Awaitable[None]]]
ORPHAN_EVENTS = {
    provisioner.ContainerQuarantined: _quarantined,
    provisioner.ContainerUnquarantined: _unquarantined,
    provisioner.ContainerDestroyed: _orphan_destroyed,
    provisioner.HostAlert: _host_alert,
}
ORPHAN_QUEUE = "gateway.orphans"
ORPHAN_BINDINGS = tuple(event.TYPE for event in ORPHAN_EVENTS)


def orphan_handlers(reports: HostReports) -> dict[str, Handler]:
    """The handler of every orphan report the gateway consumes, bound to ``reports``."""
    return {event.TYPE: partial(act, reports) for event, act in ORPHAN_EVENTS.items()}
