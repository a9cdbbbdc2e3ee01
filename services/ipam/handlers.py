"""Bus entrypoints of ipam: thin translations between contracts and :class:`Ipam` use cases.

Delivery guarantee: at least once, through the consumer wrapper. Every handler is idempotent:
allocations by machine_id, releases by the lease they end, pool commands by name; outcome
events may therefore be published more than once, always with the same content. A refused
request is answered with a failure event carrying a reason (and returned, for RPC callers),
never by a dead letter.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import structlog

from libs.common.bus import Handler, MessageContext
from libs.common.contracts.envelope import Message
from libs.common.contracts.ipam import (
    IpAllocate,
    IpAllocated,
    IpAllocatedMany,
    IpAllocateMany,
    IpAllocationFailed,
    IpHistoryEntry,
    IpInfo,
    IpLookup,
    IpRelease,
    IpReleased,
    PoolChanged,
    PoolCreate,
    PoolDelete,
    PoolInfo,
    PoolList,
    PoolListing,
    PoolRejected,
    PoolUpdate,
    PoolUsage,
)

from .domain import AllocationError, PoolRejectedError
from .service import Allocation, Ipam

__all__ = ["COMMAND_KEYS", "QUERY_KEYS", "command_handlers", "query_handlers"]

log = structlog.get_logger("ipam.handlers")


def _allocated(a: Allocation) -> IpAllocated:
    return IpAllocated(
        machine_id=a.machine_id,
        ip=a.ip,
        prefix_len=a.prefix_len,
        gateway=a.gateway,
        vlan_id=a.vlan_id,
        pool=a.pool,
        dc=a.dc,
    )


async def allocate(ipam: Ipam, msg: IpAllocate, ctx: MessageContext) -> Message:
    """``ip.allocate`` → ``ip.allocated`` or ``ip.allocation_failed``."""
    out: Message
    try:
        a = await ipam.allocate(
            msg.machine_id, pool=msg.pool, dc=msg.dc, vlan_id=msg.vlan_id, ip=msg.ip
        )
        out = _allocated(a)
        log.info("ip allocated", machine_id=a.machine_id, ip=str(a.ip), pool=a.pool)
    except AllocationError as err:
        log.warning(
            "allocation refused", machine_id=msg.machine_id, reason=err.reason, detail=str(err)
        )
        out = IpAllocationFailed(machine_id=msg.machine_id, reason=err.reason, detail=str(err))
    await ctx.publish(out)
    return out


async def allocate_many(ipam: Ipam, msg: IpAllocateMany, ctx: MessageContext) -> Message:
    """``ip.allocate_many`` → ``ip.allocated_many`` or ``ip.allocation_failed``."""
    out: Message
    try:
        got = await ipam.allocate_many(
            msg.request_id, list(msg.machine_ids), pool=msg.pool, dc=msg.dc, vlan_id=msg.vlan_id
        )
        out = IpAllocatedMany(request_id=msg.request_id, allocations=[_allocated(a) for a in got])
    except AllocationError as err:
        log.warning("bulk allocation refused", request_id=msg.request_id, reason=err.reason)
        out = IpAllocationFailed(request_id=msg.request_id, reason=err.reason, detail=str(err))
    await ctx.publish(out)
    return out


async def release(ipam: Ipam, msg: IpRelease, ctx: MessageContext) -> Message | None:
    """``ip.release`` → ``ip.released`` (a machine without lease: warning, no event)."""
    released = await ipam.release(msg.machine_id, msg.ever_ran)
    if released is None:
        log.warning("release of a machine that holds no IP ignored", machine_id=msg.machine_id)
        return None
    out = IpReleased(machine_id=msg.machine_id, ip=released["ip"], pool=released["pool"])
    log.info("ip released", machine_id=msg.machine_id, ip=released["ip"])
    await ctx.publish(out)
    return out


async def _pool_outcome(
    name: str, action: str, op: Awaitable[object], ctx: MessageContext
) -> Message:
    """Run a pool command and announce how it ended."""
    out: Message
    try:
        await op
        out = PoolChanged(name=name, action=action)  # type: ignore[arg-type]
        log.info("pool changed", pool=name, action=action)
    except PoolRejectedError as err:
        log.warning("pool command refused", pool=name, reason=err.reason, detail=str(err))
        out = PoolRejected(name=name, reason=err.reason, detail=str(err))
    await ctx.publish(out)
    return out


async def pool_create(ipam: Ipam, msg: PoolCreate, ctx: MessageContext) -> Message:
    """``pool.create`` → ``pool.changed`` (created) or ``pool.rejected``."""
    op = ipam.create_pool(
        msg.name, msg.dc, msg.vlan_id, msg.cidr, msg.gateway, list(msg.reserved), msg.cooldown_s
    )
    return await _pool_outcome(msg.name, "created", op, ctx)


async def pool_update(ipam: Ipam, msg: PoolUpdate, ctx: MessageContext) -> Message:
    """``pool.update`` → ``pool.changed`` (updated) or ``pool.rejected``."""
    reserved = None if msg.reserved is None else list(msg.reserved)
    op = ipam.update_pool(msg.name, reserved, msg.cooldown_s)
    return await _pool_outcome(msg.name, "updated", op, ctx)


async def pool_delete(ipam: Ipam, msg: PoolDelete, ctx: MessageContext) -> Message:
    """``pool.delete`` → ``pool.changed`` (deleted) or ``pool.rejected``."""
    return await _pool_outcome(msg.name, "deleted", ipam.delete_pool(msg.name), ctx)


async def pool_list(ipam: Ipam, msg: PoolList, ctx: MessageContext) -> Message:
    """``pool.list`` → ``pool.listing`` (reply only)."""
    views = await ipam.list_pools(msg.dc)
    return PoolListing(
        pools=[
            PoolInfo(
                name=v.pool.name,
                dc=v.pool.dc,
                vlan_id=v.pool.vlan_id,
                cidr=str(v.pool.network),
                gateway=v.pool.gateway,
                reserved=list(v.pool.reserved_items),
                cooldown_s=v.pool.cooldown_s,
                usage=PoolUsage(
                    total=v.total,
                    allocated=v.allocated,
                    cooling=v.cooling,
                    reserved=v.reserved,
                    free=v.free,
                ),
            )
            for v in views
        ]
    )


async def ip_lookup(ipam: Ipam, msg: IpLookup, ctx: MessageContext) -> Message:
    """``ip.lookup`` → ``ip.info`` (reply only)."""
    r = await ipam.lookup(msg.ip, msg.at)
    return IpInfo(
        ip=r.ip,
        pool=r.pool,
        state=r.state,  # type: ignore[arg-type]
        owner=r.owner,
        owner_at=r.owner_at,
        cooling_until=r.cooling_until,
        history=[
            IpHistoryEntry(machine_id=e.machine_id, action=e.action, at=e.at, pool=e.pool)
            for e in r.history
        ],
    )


_IpamHandler = Callable[[Ipam, Any, MessageContext], Awaitable[Message | None]]

# The tables are the one declaration: the queues' binding keys and handlers derive from them.
_COMMANDS: dict[str, _IpamHandler] = {
    IpAllocate.TYPE: allocate,
    IpAllocateMany.TYPE: allocate_many,
    IpRelease.TYPE: release,
    PoolCreate.TYPE: pool_create,
    PoolUpdate.TYPE: pool_update,
    PoolDelete.TYPE: pool_delete,
}
_QUERIES: dict[str, _IpamHandler] = {PoolList.TYPE: pool_list, IpLookup.TYPE: ip_lookup}

# Explicit keys, not ``pool.*``: ipam's own pool.changed/pool.rejected must not come back to it.
COMMAND_KEYS = tuple(_COMMANDS)
QUERY_KEYS = tuple(_QUERIES)


def command_handlers(ipam: Ipam) -> dict[str, Handler]:
    """Handlers of the ``ipam`` queue by message type, bound to the use cases."""
    return {kind: partial(handler, ipam) for kind, handler in _COMMANDS.items()}


def query_handlers(ipam: Ipam) -> dict[str, Handler]:
    """Handlers of the ``ipam.queries`` queue by message type, bound to the use cases."""
    return {kind: partial(handler, ipam) for kind, handler in _QUERIES.items()}
