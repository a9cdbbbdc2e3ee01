"""The shapes of the gateway's stored documents: machines, hosts, apps and releases.

They are ``TypedDict``s because the documents go to and come from MongoDB as they are; a key
that only some documents carry (set by a later step, or by an older gateway) is ``NotRequired``
and read with ``.get``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, NotRequired, TypedDict

__all__ = [
    "AppDoc",
    "HostDoc",
    "LastOp",
    "MachineDoc",
    "MachineSummary",
    "OutboxEntry",
    "ReleaseBatch",
    "ReleaseDoc",
    "ReleaseMachine",
    "ReleaseMachineStatus",
    "SagaRecord",
    "Transition",
]


class SagaRecord(TypedDict):
    """The operation in progress on a machine: its current step and when to give up on it."""

    op: str
    step: str
    attempt: int
    deadline: datetime
    params: dict[str, Any]


class LastOp(TypedDict):
    """How the machine's last operation ended (the API's waiters read it)."""

    id: str | None
    op: str | None
    ok: bool
    reason: str | None
    detail: str
    at: datetime


class OutboxEntry(TypedDict):
    """An event written with the change it announces, until the relay publishes it
    (:mod:`..outbox`); its id is the published envelope's id."""

    id: str
    type: str
    version: int
    data: dict[str, Any]
    routing_key: NotRequired[str | None]


class Transition(TypedDict):
    """One entry of a machine's state history."""

    state: str
    at: datetime
    reason: str | None


class MachineDoc(TypedDict):
    """A machine (``machines`` collection)."""

    _id: str
    type: str
    app: str
    image: str
    cpus: float
    memory: int
    disk: int
    dc: str
    vlan_id: int
    hostname: str
    ssh_keys: NotRequired[list[str]]
    direct_ssh: NotRequired[bool]
    init: NotRequired[str]  # "tini" or "systemd" when the create said; else the image's
    state: str
    reason: str | None
    ip: str | None
    host: str | None
    created_at: datetime
    updated_at: datetime
    transitions: list[Transition]
    saga: SagaRecord | None
    ip_request: NotRequired[str | None]
    # Set by the create saga once ipam answered.
    prefix_len: NotRequired[int]
    gateway: NotRequired[str]
    pool: NotRequired[str]
    container_id: NotRequired[str | None]
    ip_released: NotRequired[bool]
    ip_release_unconfirmed: NotRequired[bool]
    # Where an operation returns to.
    state_before_op: NotRequired[str]
    state_before_resize: NotRequired[str]
    state_before_unknown: NotRequired[str]
    last_op: NotRequired[LastOp]
    # Events of this machine's changes not yet published (never in its summary).
    outbox: NotRequired[list[OutboxEntry]]


class MachineSummary(TypedDict):
    """What the list shows of a machine (``machine_summaries`` collection, one per machine)."""

    _id: str
    type: str
    app: str
    state: str
    reason: str | None
    image: str
    cpus: float
    memory: int
    disk: int
    dc: str
    vlan_id: int
    hostname: str
    ip: str | None
    host: str | None
    created_at: datetime
    updated_at: datetime
    # The operation in progress (the saga's op), if any.
    pending: str | None
    due: datetime | None  # the saga step's deadline (not shown; for the saga tick)


class HostDoc(TypedDict):
    """A host as its last heartbeat described it (``hosts`` collection)."""

    _id: str
    dc: str
    labels: dict[str, str]
    capacity: dict[str, Any]
    reported: dict[str, Any]
    machines: int
    images: list[str]
    version: str
    last_seen: datetime
    status: str
    min_disk: NotRequired[int]  # the smallest data disk its volume driver makes (bytes)


class AppDoc(TypedDict):
    """An app's last create spec (scale-out repeats it)."""

    _id: str
    spec: dict[str, Any]
    created_at: NotRequired[datetime]
    updated_at: NotRequired[datetime]


class ReleaseMachine(TypedDict):
    """A machine of a release: where it is (written with the plan) and, once read, its status."""

    status: str
    type: str
    host: str | None
    ip: str | None
    at: datetime
    version: NotRequired[str]
    reason: NotRequired[str]
    detail: NotRequired[str]
    rolled_back: NotRequired[bool]
    sent_at: NotRequired[datetime]


class ReleaseMachineStatus(TypedDict):
    """One machine's deploy status in one release (``release_machines`` collection)."""

    _id: str
    release_id: str
    machine_id: str
    status: str
    at: datetime
    version: NotRequired[str]
    reason: NotRequired[str]
    detail: NotRequired[str]
    rolled_back: NotRequired[bool]
    sent_at: NotRequired[datetime]


class ReleaseBatch(TypedDict):
    """The machine ids of one batch."""

    machines: list[str]


class ReleaseDoc(TypedDict):
    """A release's plan and progress (``releases`` collection)."""

    _id: str
    app: str
    version: str
    spec: dict[str, Any]
    requested_by: str
    status: str
    reason: str | None
    batches: list[ReleaseBatch]
    current_batch: int
    failed_before: int
    machines: dict[str, ReleaseMachine]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    # The release's end event until the relay publishes it.
    outbox: NotRequired[list[OutboxEntry]]
