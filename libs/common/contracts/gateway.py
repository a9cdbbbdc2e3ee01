"""Messages of the gateway service: the commands it accepts and the events it emits.

The gateway emits ``machine.requested`` and ``machine.state_changed`` as facts for anyone who
cares (the release system, dashboards). For ``type: kvm`` machines it sends ``kvm.machine.*``
commands to the legacy KVM system and consumes the ``kvm.machine.*`` result events below; the
commands carry the full spec so that system needs nothing else from dockvm.
"""

from __future__ import annotations

from datetime import datetime
from ipaddress import IPv4Address
from typing import Literal

from pydantic import Field

from ..units import ByteSize
from .envelope import Command, Event, register

__all__ = [
    "KVM_EVENT_TYPES",
    "KvmActionDone",
    "KvmActionFailed",
    "KvmMachineCreate",
    "KvmMachineCreateFailed",
    "KvmMachineCreated",
    "KvmMachineDestroy",
    "KvmMachineDestroyed",
    "KvmMachineResize",
    "KvmMachineResizeFailed",
    "KvmMachineResized",
    "KvmMachineRestart",
    "KvmMachineStart",
    "KvmMachineStop",
    "MachineRequested",
    "MachineStateChanged",
]

MachineId = str


@register
class MachineRequested(Event):
    """Ops asked for a machine; its saga starts now."""

    TYPE = "machine.requested"
    machine_id: MachineId
    type: Literal["docker", "kvm"]
    app: str
    image: str
    cpus: float
    memory: int
    disk: int
    dc: str
    vlan_id: int
    hostname: str


@register
class MachineStateChanged(Event):
    """A machine moved from one lifecycle state to another."""

    TYPE = "machine.state_changed"
    machine_id: MachineId
    app: str
    type: Literal["docker", "kvm"] = "docker"
    from_state: str | None
    to_state: str
    reason: str | None = None
    host: str | None = None
    ip: IPv4Address | None = None
    at: datetime


# --- the legacy KVM channel ---------------------------------------------------------------


@register
class KvmMachineCreate(Command):
    """Create a KVM guest with this spec and IP; idempotent by machine_id."""

    TYPE = "kvm.machine.create"
    machine_id: MachineId = Field(min_length=1, max_length=64)
    app: str = Field(min_length=1, max_length=64)
    image: str = Field(min_length=1, max_length=512)
    cpus: float = Field(gt=0, le=512)
    memory: ByteSize
    disk: ByteSize
    dc: str
    ip: IPv4Address
    prefix_len: int = Field(ge=1, le=32)
    gateway: IPv4Address
    vlan_id: int = Field(ge=1, le=4094)
    hostname: str
    ssh_authorized_keys: list[str] = Field(default_factory=list)


class _KvmAction(Command):
    machine_id: MachineId = Field(min_length=1, max_length=64)


@register
class KvmMachineStart(_KvmAction):
    """Start a stopped KVM guest."""

    TYPE = "kvm.machine.start"


@register
class KvmMachineStop(_KvmAction):
    """Stop a KVM guest."""

    TYPE = "kvm.machine.stop"


@register
class KvmMachineRestart(_KvmAction):
    """Restart a KVM guest."""

    TYPE = "kvm.machine.restart"


@register
class KvmMachineDestroy(_KvmAction):
    """Remove a KVM guest and its disk."""

    TYPE = "kvm.machine.destroy"


@register
class KvmMachineResize(Command):
    """Change a KVM guest's cpus, memory or disk."""

    TYPE = "kvm.machine.resize"
    machine_id: MachineId = Field(min_length=1, max_length=64)
    cpus: float | None = Field(default=None, gt=0, le=512)
    memory: ByteSize | None = None
    disk: ByteSize | None = None
    force: bool = False


@register
class KvmMachineCreated(Event):
    """The legacy system runs the guest."""

    TYPE = "kvm.machine.created"
    machine_id: MachineId
    host: str = "kvm"


@register
class KvmMachineCreateFailed(Event):
    """The legacy system could not create the guest; nothing is left of it."""

    TYPE = "kvm.machine.create_failed"
    machine_id: MachineId
    reason: str


@register
class KvmActionDone(Event):
    """A start, stop or restart of a guest took effect."""

    TYPE = "kvm.machine.action_done"
    machine_id: MachineId
    action: Literal["start", "stop", "restart"]


@register
class KvmActionFailed(Event):
    """A start, stop, restart or destroy of a guest failed."""

    TYPE = "kvm.machine.action_failed"
    machine_id: MachineId
    action: Literal["start", "stop", "restart", "destroy"]
    reason: str


@register
class KvmMachineResized(Event):
    """The guest has these limits now."""

    TYPE = "kvm.machine.resized"
    machine_id: MachineId
    cpus: float
    memory: int
    disk: int


@register
class KvmMachineResizeFailed(Event):
    """The resize of a guest was refused; its limits are unchanged."""

    TYPE = "kvm.machine.resize_failed"
    machine_id: MachineId
    reason: str
    detail: str = ""


@register
class KvmMachineDestroyed(Event):
    """Nothing is left of the guest."""

    TYPE = "kvm.machine.destroyed"
    machine_id: MachineId


KVM_EVENT_TYPES = (
    KvmMachineCreated.TYPE,
    KvmMachineCreateFailed.TYPE,
    KvmActionDone.TYPE,
    KvmActionFailed.TYPE,
    KvmMachineResized.TYPE,
    KvmMachineResizeFailed.TYPE,
    KvmMachineDestroyed.TYPE,
)
