"""Messages of the provisioner (the per-host agent): host commands it accepts, events it emits.

Commands travel with the routing key ``host.<host_id>.<TYPE>``; events with their plain type.

``machines.known`` is how the control plane tells an agent which machines it holds for that
host (the full list, sent periodically by the gateway, with the control plane's ``cluster_id``;
an agent adopts the first id it hears and ignores lists of any other, or of none). A container of
this host whose machine_id stays out of the latest list for longer than the agent's orphan grace
period is quarantined, never deleted: stopped, its disk kept, ``container.quarantined``. It is
deleted (``container.destroyed`` with ``reason="orphan"``) only on ``orphan.purge`` or after the
agent's retention; a list that names it again releases it (``container.unquarantined``). A sweep
that would quarantine more than the agent's cap quarantines none and raises ``host.alert``.
Until a first list arrives the agent quarantines nothing.
"""

from __future__ import annotations

from datetime import datetime
from ipaddress import IPv4Address
from typing import Literal

from pydantic import Field

from ..units import ByteSize
from .envelope import Command, Event, register

__all__ = [
    "XFS_MIN_DISK_BYTES",
    "ContainerActionDone",
    "ContainerActionFailed",
    "ContainerCreate",
    "ContainerCreateFailed",
    "ContainerCreated",
    "ContainerDestroy",
    "ContainerDestroyed",
    "ContainerObserved",
    "ContainerQuarantined",
    "ContainerResize",
    "ContainerResizeFailed",
    "ContainerResized",
    "ContainerRestart",
    "ContainerStart",
    "ContainerStop",
    "ContainerUnquarantined",
    "HostAlert",
    "HostHeartbeat",
    "ImagePrewarm",
    "ImagePrewarmed",
    "MachineExport",
    "MachineExportEnd",
    "MachineExportEnded",
    "MachineExportFailed",
    "MachineExported",
    "MachineImport",
    "MachineImportFailed",
    "MachineImported",
    "MachinesKnown",
    "OrphanPurge",
    "OrphanPurgeRefused",
    "Resources",
]

MachineId = str
HOSTNAME_RE = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
CLUSTER_ID_RE = r"^[a-z0-9][a-z0-9-]{0,63}$"


@register
class ContainerCreate(Command):
    """Make the container of ``machine_id``; idempotent by machine_id."""

    TYPE = "container.create"
    machine_id: MachineId = Field(min_length=1, max_length=64)
    app: str = Field(min_length=1, max_length=64)
    image: str = Field(min_length=1, max_length=512)
    cpus: float = Field(gt=0, le=512)
    memory: ByteSize
    disk: ByteSize
    ip: IPv4Address
    prefix_len: int = Field(ge=1, le=32)
    gateway: IPv4Address
    vlan_id: int = Field(ge=1, le=4094)
    hostname: str = Field(pattern=HOSTNAME_RE)
    ssh_authorized_keys: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    # Break-glass: root's ssh_authorized_keys are installed and SSH answers any source. Off,
    # the machine trusts only the bastion's user CA and answers SSH only from the bastion.
    direct_ssh: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    # PID 1 of the machine; None: the image's dockvm.init label says (else tini).
    init: Literal["tini", "systemd"] | None = None


@register
class ContainerCreated(Event):
    """The container of ``machine_id`` runs on ``host``."""

    TYPE = "container.created"
    machine_id: MachineId
    container_id: str
    host: str
    ip: IPv4Address
    started_at: datetime


@register
class ContainerCreateFailed(Event):
    """No container was made and nothing was left behind."""

    TYPE = "container.create_failed"
    machine_id: MachineId
    host: str
    reason: str
    retriable: bool = False


class _Action(Command):
    machine_id: MachineId = Field(min_length=1, max_length=64)
    timeout_s: int = Field(default=30, ge=0, le=600)


@register
class ContainerStart(_Action):
    """Start a stopped machine."""

    TYPE = "container.start"


@register
class ContainerStop(_Action):
    """Stop a machine gracefully (SIGTERM, then SIGKILL after ``timeout_s``)."""

    TYPE = "container.stop"


@register
class ContainerRestart(_Action):
    """Restart a machine."""

    TYPE = "container.restart"


@register
class ContainerDestroy(_Action):
    """Remove the container, its volume and its loop device.

    ``timeout_s`` 0 (the default) powers the machine off at once, as a VM's destroy does: its
    disk goes with it, and a graceful stop of each machine of a batch queued the batch behind
    the engine's stops (bench/api.py). A positive ``timeout_s`` stops it gracefully first.
    """

    TYPE = "container.destroy"
    timeout_s: int = Field(default=0, ge=0, le=600)


@register
class ContainerActionDone(Event):
    """A start, stop or restart took effect."""

    TYPE = "container.action_done"
    machine_id: MachineId
    host: str
    action: Literal["start", "stop", "restart"]
    state: str


@register
class ContainerActionFailed(Event):
    """A start, stop, restart or destroy failed."""

    TYPE = "container.action_failed"
    machine_id: MachineId
    host: str
    action: Literal["start", "stop", "restart", "destroy"]
    reason: str
    retriable: bool = False


@register
class ContainerDestroyed(Event):
    """Nothing is left of the machine on ``host``."""

    TYPE = "container.destroyed"
    machine_id: MachineId
    host: str
    reason: Literal["requested", "orphan"] = "requested"


@register
class ContainerResize(Command):
    """Change limits live; a disk only grows; memory below usage needs ``force``."""

    TYPE = "container.resize"
    machine_id: MachineId = Field(min_length=1, max_length=64)
    cpus: float | None = Field(default=None, gt=0, le=512)
    memory: ByteSize | None = None
    disk: ByteSize | None = None
    force: bool = False


@register
class ContainerResized(Event):
    """The machine now has these limits, with no restart."""

    TYPE = "container.resized"
    machine_id: MachineId
    host: str
    cpus: float
    memory: int
    disk: int


@register
class ContainerResizeFailed(Event):
    """The resize was refused or failed; the limits are unchanged."""

    TYPE = "container.resize_failed"
    machine_id: MachineId
    host: str
    reason: str
    detail: str = ""
    retriable: bool = False


class Resources(Event):
    """CPU, memory and disk, as capacity or as allocation."""

    TYPE = "resources"
    cpus: float
    memory: int
    disk: int


# The smallest filesystem mkfs.xfs makes, hence the smallest data disk of either volume driver.
XFS_MIN_DISK_BYTES = 300 << 20


@register
class HostHeartbeat(Event):
    """Every 10 s: what a host has, what its machines were given, which images it holds."""

    TYPE = "host.heartbeat"
    host_id: str
    dc: str
    labels: dict[str, str] = Field(default_factory=dict)
    capacity: Resources
    allocated: Resources
    machines: int = 0
    images: list[str] = Field(default_factory=list)
    version: str
    at: datetime
    # The smallest data disk its volume driver can make: the gateway refuses a smaller disk at
    # once (422) instead of accepting it for the host to fail. Absent (an older agent): XFS's.
    min_disk_bytes: int = Field(default=XFS_MIN_DISK_BYTES, ge=0)


@register
class ContainerObserved(Event):
    """What reconcile saw of one labelled container."""

    TYPE = "container.observed"
    host: str
    machine_id: MachineId
    container_id: str
    state: str
    ip: IPv4Address | None = None
    cpus: float | None = None
    memory: int | None = None
    disk: int | None = None
    vlan_id: int | None = None
    orphan: bool = False


@register
class MachinesKnown(Command):
    """The full list of machine_ids the control plane holds on this host (for orphan cleanup)."""

    TYPE = "machines.known"
    machine_ids: list[MachineId] = Field(default_factory=list, max_length=100_000)
    # The control plane's identity (made once, stored); None from a gateway older than it.
    cluster_id: str | None = Field(default=None, pattern=CLUSTER_ID_RE)


@register
class ImagePrewarm(Command):
    """Pull ``ref`` ahead of the first create."""

    TYPE = "image.prewarm"
    ref: str = Field(min_length=1, max_length=512)


@register
class ImagePrewarmed(Event):
    """``host`` holds ``ref``; ``pulled`` is false when it was already there."""

    TYPE = "image.prewarmed"
    host: str
    ref: str
    pulled: bool
    error: str | None = None


@register
class ContainerQuarantined(Event):
    """An orphan of ``host`` was stopped and kept, disk and all, until purged or retained out."""

    TYPE = "container.quarantined"
    host: str
    machine_id: MachineId
    container_id: str | None = None
    was_running: bool = False
    quarantined_at: datetime
    purge_after: datetime
    cluster_id: str | None = None


@register
class ContainerUnquarantined(Event):
    """A quarantined machine was named again by the control plane and is back as it was."""

    TYPE = "container.unquarantined"
    host: str
    machine_id: MachineId
    started: bool = False


@register
class OrphanPurge(Command):
    """Delete a quarantined machine of this host: its container and its disk."""

    TYPE = "orphan.purge"
    machine_id: MachineId = Field(min_length=1, max_length=64)
    # Its requester gives up then: one still queued past it (the agent was down) is refused,
    # so a purge answered 503 never happens later behind the requester's back.
    deadline: datetime | None = None


@register
class OrphanPurgeRefused(Event):
    """Nothing was purged: ``reason`` is ``not_quarantined`` or the failure's code."""

    TYPE = "orphan.purge_refused"
    host: str
    machine_id: MachineId
    reason: str
    retriable: bool = False


@register
class HostAlert(Event):
    """Something on ``host`` needs a person (``cleared``: it no longer does).

    Reasons: ``orphan_sweep_capped`` (a sweep found more orphans than the cap and quarantined
    none: more likely a control-plane fault than real orphans), ``foreign_cluster`` (a list of
    known machines came from another control plane and was ignored).
    """

    TYPE = "host.alert"
    host: str
    reason: str
    detail: str = ""
    count: int = 0
    cleared: bool = False
    at: datetime


# ---- cold migration: a stopped machine's disk and identity move to another host -------------
# The gateway's migrate saga (services/gateway/service/migrate.py) sends them: export to the
# source, import to the target, then export.end to the source (moved: remove what is left; back:
# start it again where it was). The disk goes from the source agent's HTTP port to the target
# agent, as a stream of the volume file's data extents (services/provisioner/adapters/transfer.py).


@register
class MachineExport(Command):
    """Stop the machine, detach its disk and offer its disk and identity for one import."""

    TYPE = "machine.export"
    machine_id: MachineId = Field(min_length=1, max_length=64)
    # The one-time credential the importer presents (made by the gateway, 32+ url-safe chars).
    token: str = Field(min_length=32, max_length=128, repr=False)
    timeout_s: int = Field(default=30, ge=0, le=600)


@register
class MachineExported(Event):
    """The machine is stopped on ``host`` and its disk and identity wait at ``url``."""

    TYPE = "machine.exported"
    machine_id: MachineId
    host: str
    url: str
    disk: int
    was_running: bool


@register
class MachineExportFailed(Event):
    """Nothing was exported; the machine is as it was on ``host`` (started again if it ran)."""

    TYPE = "machine.export_failed"
    machine_id: MachineId
    host: str
    reason: str
    retriable: bool = False


@register
class MachineImport(ContainerCreate):
    """Make the machine from the disk and identity another host exports at ``source_url``."""

    TYPE = "machine.import"
    source_url: str = Field(min_length=1, max_length=512)
    token: str = Field(min_length=32, max_length=128, repr=False)
    start: bool = True
    # Its requester gives up then: one still queued past it is refused, so a late import never
    # makes a second copy of a machine that went back to its source.
    deadline: datetime | None = None


@register
class MachineImported(Event):
    """The machine is on ``host`` with its disk and identity (running if ``start``)."""

    TYPE = "machine.imported"
    machine_id: MachineId
    host: str
    container_id: str
    state: str
    bytes_copied: int = 0


@register
class MachineImportFailed(Event):
    """No copy of the machine was made on ``host`` and nothing was left behind."""

    TYPE = "machine.import_failed"
    machine_id: MachineId
    host: str
    reason: str
    retriable: bool = False


@register
class MachineExportEnd(Command):
    """End an export: ``moved`` removes what is left of the machine here; ``back`` re-attaches
    its disk and starts it again (``start``) with the same identity."""

    TYPE = "machine.export_end"
    machine_id: MachineId = Field(min_length=1, max_length=64)
    outcome: Literal["moved", "back"]
    start: bool = True
    timeout_s: int = Field(default=30, ge=0, le=600)


@register
class MachineExportEnded(Event):
    """An export ended on ``host`` as ``outcome`` (``ok`` false: the step failed, ``reason``)."""

    TYPE = "machine.export_ended"
    machine_id: MachineId
    host: str
    outcome: Literal["moved", "back"]
    ok: bool = True
    state: str = ""
    reason: str = ""


@register
class MachineHostKeysGet(Command):
    """The SSH host public keys of ``machine_id`` (an RPC to its host, from the bastion)."""

    TYPE = "machine.host_keys.get"
    machine_id: MachineId = Field(min_length=1, max_length=64)


@register
class MachineHostKeys(Event):
    """The host public keys sshd of ``machine_id`` serves, as OpenSSH lines, read from its
    container's filesystem; empty with ``reason`` when they cannot be read (not here, not
    running, no key yet)."""

    TYPE = "machine.host_keys"
    machine_id: MachineId
    host: str
    keys: list[str] = Field(default_factory=list)
    reason: str = ""
