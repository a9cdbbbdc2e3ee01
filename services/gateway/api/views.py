"""How stored documents and path values are shown and checked, shared by several route modules."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

from ..domain.models import MachineOut
from .framework import FieldErrors

__all__ = ["ipv4", "machine_links", "machine_out"]


def machine_links(mid: str) -> dict[str, str]:
    """Where to follow a machine."""
    return {"self": f"/v1/machines/{mid}"}


def machine_out(doc: dict[str, Any]) -> MachineOut:
    """The API view of a machine document."""
    mid = doc["_id"]
    return MachineOut(
        id=mid,
        type=doc["type"],
        app=doc["app"],
        state=doc["state"],
        reason=doc.get("reason"),
        image=doc["image"],
        cpus=doc["cpus"],
        memory=doc["memory"],
        disk=doc["disk"],
        dc=doc["dc"],
        vlan_id=doc["vlan_id"],
        hostname=doc["hostname"],
        ip=doc.get("ip"),
        host=doc.get("host"),
        pending=(doc.get("saga") or {}).get("op"),
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
        transitions=doc.get("transitions") or [],
        links=machine_links(mid),
    )


def ipv4(raw: str, field: str) -> str:
    """``raw`` as a canonical IPv4 address, or a 422 on ``field``."""
    try:
        return str(IPv4Address(raw))
    except ValueError as err:
        raise FieldErrors.one(field, "ip", f"{raw!r} is not an IPv4 address") from err
