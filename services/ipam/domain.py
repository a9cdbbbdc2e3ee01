"""Pure IPAM logic: pool validation, address arithmetic, blocks of never-used addresses.

No I/O here. Addresses are handled as integers; a pool's *offset* is an address minus the
network address, so offset 0 is the network and ``size - 1`` the broadcast.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from ipaddress import AddressValueError, IPv4Address, IPv4Network, NetmaskValueError

from libs.common.errors import DomainError

__all__ = [
    "AllocationError",
    "HistoryEvent",
    "Pool",
    "PoolRejectedError",
    "Range",
    "block_offsets",
    "history_of",
    "lease_id",
    "merge_ranges",
    "next_block",
    "owner_at",
    "parse_network",
    "parse_reserved",
    "subtract_ranges",
    "validate_pool",
]

MAX_PREFIX = 30  # a /31 or /32 has no usable host address once network/broadcast are excluded
Range = tuple[int, int]  # inclusive integer address range


class AllocationError(DomainError):
    """No IP can be given as asked; ``reason`` is the stable code of ``ip.allocation_failed``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)


class PoolRejectedError(DomainError):
    """A pool command is refused; ``reason`` is the stable code of ``pool.rejected``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, reason=reason)


def parse_network(cidr: str) -> IPv4Network:
    """Parse a strict IPv4 CIDR (host bits must be zero) of at most /30."""
    try:
        net = IPv4Network(cidr, strict=True)
    except (AddressValueError, NetmaskValueError, ValueError) as err:
        raise PoolRejectedError("invalid", f"malformed cidr {cidr!r}: {err}") from err
    if "/" not in cidr:
        raise PoolRejectedError("invalid", f"cidr {cidr!r} has no prefix length")
    if net.prefixlen > MAX_PREFIX:
        raise PoolRejectedError("invalid", f"cidr {cidr} is smaller than a /{MAX_PREFIX}")
    return net


def merge_ranges(ranges: Iterable[Range]) -> tuple[Range, ...]:
    """Sort and merge overlapping or touching ranges."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return tuple((lo, hi) for lo, hi in out)


def subtract_ranges(a: Sequence[Range], b: Sequence[Range]) -> tuple[Range, ...]:
    """The addresses of ``a`` that are not in ``b`` (both merged), as merged ranges."""
    out: list[Range] = []
    for lo, hi in a:
        cur = lo
        for blo, bhi in b:
            if bhi < cur or blo > hi:
                continue
            if blo > cur:
                out.append((cur, blo - 1))
            cur = max(cur, bhi + 1)
            if cur > hi:
                break
        if cur <= hi:
            out.append((cur, hi))
    return merge_ranges(out)


def _parse_one(item: str) -> Range:
    text = item.strip()
    if "/" in text:
        net = IPv4Network(text, strict=True)
        return int(net.network_address), int(net.broadcast_address)
    if "-" in text:
        a, b = (p.strip() for p in text.split("-", 1))
        lo, hi = int(IPv4Address(a)), int(IPv4Address(b))
        if lo > hi:
            raise ValueError(f"range {text!r} ends before it starts")
        return lo, hi
    ip = int(IPv4Address(text))
    return ip, ip


def parse_reserved(items: Sequence[str], network: IPv4Network) -> tuple[Range, ...]:
    """Parse reserved addresses (``a.b.c.d``, ``a.b.c.d-e.f.g.h`` or a CIDR) inside ``network``."""
    ranges = []
    first, last = int(network.network_address), int(network.broadcast_address)
    for item in items:
        try:
            lo, hi = _parse_one(item)
        except ValueError as err:
            raise PoolRejectedError("invalid", f"bad reserved entry {item!r}: {err}") from err
        if lo < first or hi > last:
            raise PoolRejectedError("invalid", f"reserved {item!r} is outside {network}")
        ranges.append((lo, hi))
    return merge_ranges(ranges)


def lease_id(pool_uid: str, ip_int: int, gen: int) -> str:
    """The ``_id`` of the ``gen``-th lease of an address: the unique key that arbitrates claims."""
    return f"{pool_uid}:{IPv4Address(ip_int)}#{gen}"


@dataclass(frozen=True)
class Pool:
    """A pool of one VLAN in one dc, as stored."""

    name: str
    uid: str
    dc: str
    vlan_id: int
    network: IPv4Network
    gateway: IPv4Address
    reserved_items: tuple[str, ...]
    reserved: tuple[Range, ...]
    cooldown_s: int
    _starts: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_starts", tuple(lo for lo, _ in self.reserved))

    @property
    def first(self) -> int:
        """The network address as an integer."""
        return int(self.network.network_address)

    @property
    def size(self) -> int:
        """Number of addresses in the cidr, network and broadcast included."""
        return self.network.num_addresses

    @property
    def cooldown(self) -> timedelta:
        """How long a released address rests before it is handed out again."""
        return timedelta(seconds=self.cooldown_s)

    def contains(self, ip: int) -> bool:
        """Whether ``ip`` is inside the cidr (network and broadcast included)."""
        return self.first <= ip < self.first + self.size

    def _reserved_range_of(self, ip: int) -> Range | None:
        i = bisect.bisect_right(self._starts, ip) - 1
        if i >= 0 and self.reserved[i][1] >= ip:
            return self.reserved[i]
        return None

    def why_not_allocatable(self, ip: int) -> str | None:
        """``None`` if ``ip`` may be handed out, else the reason code it may not."""
        if not self.contains(ip):
            return "ip_outside_pool"
        if ip in (self.first, self.first + self.size - 1, int(self.gateway)):
            return "ip_reserved"
        if self._reserved_range_of(ip) is not None:
            return "ip_reserved"
        return None

    def allocatable(self, ip: int) -> bool:
        """Whether ``ip`` may ever be handed out."""
        return self.why_not_allocatable(ip) is None

    def next_allocatable(self, offset: int) -> int | None:
        """Smallest allocatable offset >= ``offset``; cost grows with reserved ranges, not size."""
        o = max(offset, 1)
        while o < self.size - 1:
            ip = self.first + o
            if ip == int(self.gateway):
                o += 1
                continue
            rng = self._reserved_range_of(ip)
            if rng is not None:
                o = rng[1] - self.first + 1
                continue
            return o
        return None

    def reserved_count(self) -> int:
        """Usable addresses never handed out: the gateway plus the reserved ranges."""
        lo, hi = self.first + 1, self.first + self.size - 2
        count = sum(max(0, min(b, hi) - max(a, lo) + 1) for a, b in self.reserved)
        if self._reserved_range_of(int(self.gateway)) is None:
            count += 1
        return count

    def usable_count(self) -> int:
        """Addresses other than network and broadcast."""
        return self.size - 2


def block_offsets(pool: Pool, block: int, block_size: int) -> list[int]:
    """The allocatable offsets of block ``block`` (offsets ``[block*size, block*size+size)``)."""
    out = []
    o = pool.next_allocatable(block * block_size)
    end = min((block + 1) * block_size, pool.size)
    while o is not None and o < end:
        out.append(o)
        o = pool.next_allocatable(o + 1)
    return out


def next_block(pool: Pool, block: int, block_size: int) -> int | None:
    """The first block >= ``block`` that holds an allocatable address (skips reserved spans)."""
    o = pool.next_allocatable(block * block_size)
    return None if o is None else o // block_size


def validate_pool(
    name: str,
    dc: str,
    vlan_id: int,
    cidr: str,
    gateway: IPv4Address,
    reserved: Sequence[str],
    cooldown_s: int,
    uid: str,
) -> Pool:
    """Check a pool's own fields (not its neighbours) and build it."""
    if not 1 <= vlan_id <= 4094:
        raise PoolRejectedError("invalid", f"vlan_id {vlan_id} is outside 1-4094")
    if cooldown_s < 0:
        raise PoolRejectedError("invalid", "cooldown_s must not be negative")
    net = parse_network(cidr)
    gw = int(gateway)
    if not (int(net.network_address) < gw < int(net.broadcast_address)):
        raise PoolRejectedError("invalid", f"gateway {gateway} is not a host address of {net}")
    ranges = parse_reserved(reserved, net)
    return Pool(name, uid, dc, vlan_id, net, gateway, tuple(reserved), ranges, cooldown_s)


@dataclass(frozen=True)
class HistoryEvent:
    """One step of an IP's history, derived from a lease record."""

    machine_id: str
    action: str
    at: datetime
    pool: str


def history_of(leases: Iterable[dict]) -> Iterator[HistoryEvent]:
    """Expand lease records (allocated_at, released_at) into time-ordered history events."""
    # Leases of one address never overlap, so lease order is time order even when an address
    # is released and handed out again within the same millisecond.
    for lease in sorted(leases, key=lambda d: (d["allocated_at"], d.get("gen", 0))):
        yield HistoryEvent(lease["machine_id"], "allocated", lease["allocated_at"], lease["pool"])
        if lease.get("released_at") is not None:
            yield HistoryEvent(lease["machine_id"], "released", lease["released_at"], lease["pool"])


def owner_at(leases: Iterable[dict], at: datetime) -> str | None:
    """The machine that held the address at ``at``, from its lease records."""
    for lease in leases:
        released = lease.get("released_at")
        if lease["allocated_at"] <= at and (released is None or at < released):
            return lease["machine_id"]
    return None
