"""The shapes of ipam's stored documents: pools, leases, history records, free-queue entries.

They are ``TypedDict``s because the documents go to and come from MongoDB as they are; a key
that only some documents carry (a hint not written yet, a field older leases lack) is
``NotRequired`` and read with ``.get``. What each collection is for, and how it copes with
FerretDB v1, is in :mod:`services.ipam.store`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, NotRequired, TypedDict

__all__ = [
    "CleanupDoc",
    "FreeSlotDoc",
    "HintField",
    "HistoryDoc",
    "HistoryFields",
    "LeaseDoc",
    "PoolChanges",
    "PoolDoc",
    "ReleasedIp",
]

# A pool's counters that only save probing (see :meth:`IpamStore.raise_hint`).
HintField = Literal["block_hint", "free_head", "free_tail", "ready_head", "ready_tail"]


class PoolDoc(TypedDict):
    """A pool (``pools``; ``pools_deleted`` keeps the same shape under ``_id`` = uid)."""

    _id: str  # the pool's name
    uid: str  # tells a pool from a later pool of the same name (history keys use it)
    dc: str
    vlan_id: int
    cidr: str
    gateway: str
    reserved: list[str]  # as given: addresses, ranges ``a-b`` or CIDRs
    cooldown_s: int
    first: int  # network and broadcast addresses as integers (for overlap and ip filters)
    last: int
    state: str  # "pending" while a create checks its neighbours, "active", "deleting"
    created_at: datetime
    block_hint: NotRequired[int]  # highest block claimed, or -1
    free_head: NotRequired[int]  # free-queue entries below are consumed
    free_tail: NotRequired[int]  # next free-queue sequence number to append at
    ready_head: NotRequired[int]  # the same two for the ready lane (machines that never ran)
    ready_tail: NotRequired[int]


class PoolChanges(TypedDict, total=False):
    """The fields a pool command changes on a pool."""

    state: str
    reserved: list[str]
    cooldown_s: int


class LeaseDoc(TypedDict):
    """A machine's lease (``leases``, ``_id`` = machine), active or a released tombstone."""

    _id: str  # the machine
    active_ip: str  # the IP while active (unique); ``released:<machine>`` once released
    ip: str
    gen: int  # this lease is the gen-th allocation of the IP in its pool
    pool: str
    pool_uid: str
    dc: str
    vlan_id: int
    prefix_len: int
    gateway: str
    allocated_at: datetime
    request_id: str | None  # the bulk request that made it, for its rollback
    state: str  # "active" or "released"
    # How the claim is checked: "probe" (a never-used address: gen 1's history is read after
    # the insert) or "history" (its gen's history record is inserted); absent means "history".
    claim: NotRequired[str]
    # Tells this claim from any other lease of the machine, even of the same address: a stale
    # claim's cleanup deletes only it. Absent on leases written before it existed.
    claim_id: NotRequired[str]
    released_at: NotRequired[datetime]  # on tombstones


class HistoryFields(TypedDict, total=False):
    """Fields of an ``ip_history`` record, as one write sets some of them."""

    ip: str
    pool: str
    pool_uid: str
    gen: int
    machine_id: str
    allocated_at: datetime
    released_at: datetime | None
    ever_ran: bool


class HistoryDoc(TypedDict):
    """The gen-th allocation of an IP in a pool (``ip_history``, ``_id`` = ``history_id``)."""

    _id: str
    ip: str
    pool: str
    pool_uid: str
    gen: int
    machine_id: str
    allocated_at: datetime
    released_at: datetime | None  # None while the machine holds the IP
    # False when its machine never ran: the release did not cool down. Absent means it ran.
    ever_ran: NotRequired[bool]


class ReleasedIp(TypedDict):
    """What a release answers: the IP a machine gave back (its history record, when new)."""

    ip: str
    pool: str
    machine_id: str
    released_at: datetime | None
    pool_uid: NotRequired[str]
    gen: NotRequired[int]
    allocated_at: NotRequired[datetime]
    ever_ran: NotRequired[bool]


class FreeSlotDoc(TypedDict):
    """Entry ``seq`` of one of a pool's free queues (``ip_free``, ``_id`` = ``slot_id`` of the
    lane's key; see ``service.allocator.Lane``); immutable."""

    _id: str
    pool_uid: str
    ip_int: int
    ip: str
    gen: int  # the generation that was released; a claim inserts gen + 1
    released_at: datetime


class CleanupDoc(TypedDict):
    """Who won the right to delete a stale claim (``lease_cleanups``, ``_id`` = ``cleanup_id``)."""

    _id: str
    machine_id: str
    at: datetime  # a winner that has not deleted the claim after abandoned_claim_s died
