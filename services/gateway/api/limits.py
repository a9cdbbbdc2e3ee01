"""Checks of a request against what the hosts report of themselves: the smallest data disk.

A disk below what a host's volume driver can make (mkfs.xfs makes nothing under 300 MiB) used to
be accepted with a 202 and fail on the host, after an IP was claimed and a machine stored. The
hosts report their minimum in every heartbeat; a request whose disk is below the largest
minimum of the dc's hosts is a 422 before anything is written. Until a host has reported, the
default is XFS's, never "anything goes".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aiohttp import web

from libs.common.contracts.provisioner import XFS_MIN_DISK_BYTES
from libs.common.units import format_bytes

from ..documents import HostDoc
from .deps import STORE
from .framework import FieldErrors

__all__ = ["check_disk", "disk_errors", "min_disk"]


def min_disk(hosts: Iterable[HostDoc], dc: str | None = None) -> int:
    """The smallest disk every host of ``dc`` (every host when None) can make: the largest of
    their minimums, XFS's when none of them has reported one."""
    reported = [h.get("min_disk", XFS_MIN_DISK_BYTES) for h in hosts if dc is None or h["dc"] == dc]
    return max(reported, default=XFS_MIN_DISK_BYTES)


async def disk_errors(
    request: web.Request, disk: int | None, dc: str | None, field: str = "disk", whose: str = ""
) -> list[dict[str, Any]]:
    """The failing field when ``disk`` is below what the hosts of ``dc`` can make, else none."""
    if disk is None:
        return []
    least = min_disk(await request.app[STORE].list_hosts(), dc)
    if disk >= least:
        return []
    where = f"the hosts of {dc}" if dc else "the hosts"
    message = (
        f"{whose}{format_bytes(disk)} is below {format_bytes(least)}, the smallest disk "
        f"{where} can make"
    )
    return [{"field": field, "type": "too_small", "message": message}]


async def check_disk(
    request: web.Request, disk: int | None, dc: str | None, field: str = "disk", whose: str = ""
) -> None:
    """422 naming ``field`` when ``disk`` is below what the hosts of ``dc`` can make."""
    errors = await disk_errors(request, disk, dc, field, whose)
    if errors:
        raise FieldErrors(errors)
