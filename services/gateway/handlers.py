"""Bus entrypoints of the gateway: thin handlers that hand each result event to the saga driver.

Delivery guarantee: at least once; every driver method is conditional on the machine's current
state (the machine id is the natural key), so a redelivered or duplicated event changes nothing.
"""

from __future__ import annotations

from libs.common.bus import Handler, MessageContext
from libs.common.contracts import gateway as gw
from libs.common.contracts import imagesync, ipam, monitor, provisioner

from .sagas import SagaDriver

__all__ = ["BINDINGS", "QUEUE", "build_handlers"]

QUEUE = "gateway"


def build_handlers(driver: SagaDriver) -> dict[str, Handler]:
    """The handler of every event type the gateway consumes."""

    async def ip_allocated(msg: ipam.IpAllocated, ctx: MessageContext) -> None:
        await driver.on_ip_allocated(msg)

    async def ip_allocated_many(msg: ipam.IpAllocatedMany, ctx: MessageContext) -> None:
        await driver.on_ip_allocated_many(list(msg.allocations))

    async def ip_failed(msg: ipam.IpAllocationFailed, ctx: MessageContext) -> None:
        await driver.on_ip_failed(msg)

    async def ip_released(msg: ipam.IpReleased, ctx: MessageContext) -> None:
        await driver.on_ip_released(msg.machine_id)

    async def created(msg: provisioner.ContainerCreated, ctx: MessageContext) -> None:
        await driver.on_created(msg.machine_id, msg.host, msg.container_id)

    async def create_failed(msg: provisioner.ContainerCreateFailed, ctx: MessageContext) -> None:
        await driver.on_create_failed(msg.machine_id, msg.reason, msg.retriable)

    async def action_done(msg: provisioner.ContainerActionDone, ctx: MessageContext) -> None:
        await driver.on_action_done(msg.machine_id, msg.action)

    async def action_failed(msg: provisioner.ContainerActionFailed, ctx: MessageContext) -> None:
        await driver.on_action_failed(msg.machine_id, msg.action, msg.reason)

    async def destroyed(msg: provisioner.ContainerDestroyed, ctx: MessageContext) -> None:
        await driver.on_destroyed(msg.machine_id)

    async def resized(msg: provisioner.ContainerResized, ctx: MessageContext) -> None:
        await driver.on_resized(msg.machine_id, msg.cpus, msg.memory, msg.disk)

    async def resize_failed(msg: provisioner.ContainerResizeFailed, ctx: MessageContext) -> None:
        await driver.on_resize_failed(msg.machine_id, msg.reason, msg.detail)

    async def heartbeat(msg: provisioner.HostHeartbeat, ctx: MessageContext) -> None:
        await driver.on_heartbeat(msg)

    async def observed(msg: provisioner.ContainerObserved, ctx: MessageContext) -> None:
        await driver.on_observed(msg.machine_id, msg.state)

    async def kvm_created(msg: gw.KvmMachineCreated, ctx: MessageContext) -> None:
        await driver.on_created(msg.machine_id, msg.host, None)

    async def kvm_create_failed(msg: gw.KvmMachineCreateFailed, ctx: MessageContext) -> None:
        await driver.on_create_failed(msg.machine_id, msg.reason)

    async def kvm_action_done(msg: gw.KvmActionDone, ctx: MessageContext) -> None:
        await driver.on_action_done(msg.machine_id, msg.action)

    async def kvm_action_failed(msg: gw.KvmActionFailed, ctx: MessageContext) -> None:
        await driver.on_action_failed(msg.machine_id, msg.action, msg.reason)

    async def kvm_resized(msg: gw.KvmMachineResized, ctx: MessageContext) -> None:
        await driver.on_resized(msg.machine_id, msg.cpus, msg.memory, msg.disk)

    async def kvm_resize_failed(msg: gw.KvmMachineResizeFailed, ctx: MessageContext) -> None:
        await driver.on_resize_failed(msg.machine_id, msg.reason, msg.detail)

    async def kvm_destroyed(msg: gw.KvmMachineDestroyed, ctx: MessageContext) -> None:
        await driver.on_destroyed(msg.machine_id)

    async def replicated(msg: imagesync.ImageReplicated, ctx: MessageContext) -> None:
        ref = msg.ref or f"{msg.registry}/{msg.repo}:{msg.tag}"
        await driver.prewarm(msg.dc, ref)

    async def started(msg: monitor.ContainerStarted, ctx: MessageContext) -> None:
        await driver.on_lifecycle(msg.machine_id, "started")

    async def died(msg: monitor.ContainerDied, ctx: MessageContext) -> None:
        kind = "oom_killed" if msg.oom_killed else "died"
        await driver.on_lifecycle(msg.machine_id, kind, f"{kind} (exit {msg.exit_code})")

    async def flapping(msg: monitor.ContainerFlapping, ctx: MessageContext) -> None:
        await driver.on_lifecycle(
            msg.machine_id, "flapping", f"flapping: {msg.restarts} restarts in {msg.window_s}s"
        )

    return {
        imagesync.ImageReplicated.TYPE: replicated,
        monitor.ContainerStarted.TYPE: started,
        monitor.ContainerDied.TYPE: died,
        monitor.ContainerFlapping.TYPE: flapping,
        ipam.IpAllocated.TYPE: ip_allocated,
        ipam.IpAllocatedMany.TYPE: ip_allocated_many,
        ipam.IpAllocationFailed.TYPE: ip_failed,
        ipam.IpReleased.TYPE: ip_released,
        provisioner.ContainerCreated.TYPE: created,
        provisioner.ContainerCreateFailed.TYPE: create_failed,
        provisioner.ContainerActionDone.TYPE: action_done,
        provisioner.ContainerActionFailed.TYPE: action_failed,
        provisioner.ContainerDestroyed.TYPE: destroyed,
        provisioner.ContainerResized.TYPE: resized,
        provisioner.ContainerResizeFailed.TYPE: resize_failed,
        provisioner.HostHeartbeat.TYPE: heartbeat,
        provisioner.ContainerObserved.TYPE: observed,
        gw.KvmMachineCreated.TYPE: kvm_created,
        gw.KvmMachineCreateFailed.TYPE: kvm_create_failed,
        gw.KvmActionDone.TYPE: kvm_action_done,
        gw.KvmActionFailed.TYPE: kvm_action_failed,
        gw.KvmMachineResized.TYPE: kvm_resized,
        gw.KvmMachineResizeFailed.TYPE: kvm_resize_failed,
        gw.KvmMachineDestroyed.TYPE: kvm_destroyed,
    }


# Exact event keys only: a pattern like ``kvm.#`` would also catch our own commands.
BINDINGS = (
    imagesync.ImageReplicated.TYPE,
    monitor.ContainerStarted.TYPE,
    monitor.ContainerDied.TYPE,
    monitor.ContainerFlapping.TYPE,
    ipam.IpAllocated.TYPE,
    ipam.IpAllocatedMany.TYPE,
    ipam.IpAllocationFailed.TYPE,
    ipam.IpReleased.TYPE,
    provisioner.ContainerCreated.TYPE,
    provisioner.ContainerCreateFailed.TYPE,
    provisioner.ContainerActionDone.TYPE,
    provisioner.ContainerActionFailed.TYPE,
    provisioner.ContainerDestroyed.TYPE,
    provisioner.ContainerResized.TYPE,
    provisioner.ContainerResizeFailed.TYPE,
    provisioner.HostHeartbeat.TYPE,
    provisioner.ContainerObserved.TYPE,
    *gw.KVM_EVENT_TYPES,
)
