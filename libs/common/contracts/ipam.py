"""Messages of the ipam service: the commands it accepts, the events it emits, its RPC replies.

Commands on queue ``ipam``: ``ip.allocate``, ``ip.allocate_many``, ``ip.release``,
``pool.create|update|delete`` (the pool commands also answer an RPC with their outcome).
Queries on queue ``ipam.queries`` (RPC only, not deduplicated): ``pool.list`` → ``pool.listing``,
``ip.lookup`` → ``ip.info``.
"""

from __future__ import annotations

from datetime import datetime
from ipaddress import IPv4Address
from typing import Literal

from pydantic import Field, model_validator

from .envelope import Command, Event, register

__all__ = [
    "IpAllocate",
    "IpAllocateMany",
    "IpAllocated",
    "IpAllocatedMany",
    "IpAllocationFailed",
    "IpHistoryEntry",
    "IpInfo",
    "IpLookup",
    "IpRelease",
    "IpReleased",
    "PoolChanged",
    "PoolCreate",
    "PoolDelete",
    "PoolInfo",
    "PoolList",
    "PoolListing",
    "PoolRejected",
    "PoolUpdate",
    "PoolUsage",
]

MachineId = str


class _PoolSelector(Command):
    pool: str | None = None
    dc: str | None = None
    # The range (1-4094) is checked by ipam, so that a bad value gets an answer with a reason.
    vlan_id: int | None = None

    @model_validator(mode="after")
    def _pool_or_dc_vlan(self) -> _PoolSelector:
        if self.pool is None and (self.dc is None or self.vlan_id is None):
            raise ValueError("give either pool, or both dc and vlan_id")
        return self


@register
class IpAllocate(_PoolSelector):
    """Give ``machine_id`` an IP for life; idempotent by machine_id."""

    TYPE = "ip.allocate"
    machine_id: MachineId = Field(min_length=1, max_length=64)
    ip: IPv4Address | None = None


@register
class IpAllocateMany(_PoolSelector):
    """Give every machine of a scale-out an IP, all or nothing."""

    TYPE = "ip.allocate_many"
    request_id: str = Field(min_length=1, max_length=64)
    machine_ids: list[MachineId] = Field(min_length=1, max_length=1000)


@register
class IpRelease(Command):
    """Free the IP of a destroyed machine; it then cools down, unless the machine never ran."""

    TYPE = "ip.release"
    machine_id: MachineId = Field(min_length=1, max_length=64)
    # False: the machine never reached running (a failed create), so nothing out there knows
    # the address (no ARP cache, no known_hosts entry) and it goes straight back to the free
    # list. Absent (an older sender) means it ran.
    ever_ran: bool = True


@register
class PoolCreate(Command):
    """Create an address pool on one VLAN of one dc."""

    TYPE = "pool.create"
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    dc: str = Field(min_length=1, max_length=32)
    vlan_id: int  # 1-4094, checked by ipam (answered with pool.rejected reason "invalid")
    cidr: str
    gateway: IPv4Address
    reserved: list[str] = Field(default_factory=list)
    cooldown_s: int = Field(default=7 * 24 * 3600, ge=0)


@register
class PoolUpdate(Command):
    """Change a pool's reserved addresses or cooldown."""

    TYPE = "pool.update"
    name: str
    reserved: list[str] | None = None
    cooldown_s: int | None = Field(default=None, ge=0)


@register
class PoolDelete(Command):
    """Delete a pool that has no active lease."""

    TYPE = "pool.delete"
    name: str


@register
class IpAllocated(Event):
    """``machine_id`` holds ``ip`` until it is released."""

    TYPE = "ip.allocated"
    machine_id: MachineId
    ip: IPv4Address
    prefix_len: int
    gateway: IPv4Address
    vlan_id: int
    pool: str
    dc: str


@register
class IpAllocatedMany(Event):
    """Every machine of a bulk request got its IP."""

    TYPE = "ip.allocated_many"
    request_id: str
    allocations: list[IpAllocated]


@register
class IpAllocationFailed(Event):
    """No IP was given; ``reason`` is a stable code such as ``pool_exhausted``."""

    TYPE = "ip.allocation_failed"
    machine_id: MachineId | None = None
    request_id: str | None = None
    reason: str
    detail: str = ""


@register
class IpReleased(Event):
    """The IP of ``machine_id`` is cooling down."""

    TYPE = "ip.released"
    machine_id: MachineId
    ip: IPv4Address
    pool: str


@register
class PoolChanged(Event):
    """A pool was created, updated or deleted."""

    TYPE = "pool.changed"
    name: str
    action: Literal["created", "updated", "deleted"]


@register
class PoolRejected(Event):
    """A pool command was refused; nothing changed."""

    TYPE = "pool.rejected"
    name: str
    reason: str
    detail: str = ""


@register
class PoolList(Command):
    """Query (RPC): the pools, optionally of one dc, with their usage."""

    TYPE = "pool.list"
    dc: str | None = None


class PoolUsage(Event):
    """How a pool's usable addresses are spent; ``total`` excludes network and broadcast."""

    total: int
    allocated: int
    cooling: int
    reserved: int
    free: int


class PoolInfo(Event):
    """One pool as listed."""

    name: str
    dc: str
    vlan_id: int
    cidr: str
    gateway: IPv4Address
    reserved: list[str]
    cooldown_s: int
    usage: PoolUsage


@register
class PoolListing(Event):
    """Reply to ``pool.list``."""

    TYPE = "pool.listing"
    pools: list[PoolInfo]


@register
class IpLookup(Command):
    """Query (RPC): the state, owner and history of one IP; ``at`` asks for the owner then."""

    TYPE = "ip.lookup"
    ip: IPv4Address
    at: datetime | None = None


class IpHistoryEntry(Event):
    """One allocate or release of an IP."""

    machine_id: MachineId
    action: Literal["allocated", "released"]
    at: datetime
    pool: str = ""


@register
class IpInfo(Event):
    """Reply to ``ip.lookup``: who holds the IP now (and at ``at``), and its whole history."""

    TYPE = "ip.info"
    ip: IPv4Address
    pool: str | None
    state: Literal["active", "cooling", "free", "reserved", "unknown"]
    owner: MachineId | None = None
    owner_at: MachineId | None = None
    cooling_until: datetime | None = None
    history: list[IpHistoryEntry] = Field(default_factory=list)
