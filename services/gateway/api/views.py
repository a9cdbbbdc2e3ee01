"""How stored documents and path values are shown and checked, shared by several route modules."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address
from typing import Any

from ..domain.models import MachineOut, MachineSummaryOut
from .framework import FieldErrors

__all__ = ["ipv4", "machine_links", "machine_out", "summary_out"]


def machine_links(mid: str) -> dict[str, str]:
    """Where to follow a machine."""
    return {"self": f"/v1/machines/{mid}"}


def _shown(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a machine document and its summary both show."""
    mid = doc["_id"]
    return {
        "id": mid,
        "type": doc["type"],
        "app": doc["app"],
        "state": doc["state"],
        "reason": doc.get("reason"),
        "image": doc["image"],
        "cpus": doc["cpus"],
        "memory": doc["memory"],
        "disk": doc["disk"],
        "dc": doc["dc"],
        "vlan_id": doc["vlan_id"],
        "hostname": doc["hostname"],
        "ip": doc.get("ip"),
        "host": doc.get("host"),
        "created_at": doc["created_at"],
        "updated_at": doc["updated_at"],
        "links": machine_links(mid),
    }


def machine_out(doc: Mapping[str, Any]) -> MachineOut:
    """The API view of a machine document, with its transitions."""
    return MachineOut(
        **_shown(doc),
        pending=(doc.get("saga") or {}).get("op"),
        transitions=doc.get("transitions") or [],
    )


def summary_out(doc: Mapping[str, Any]) -> MachineSummaryOut:
    """The list's view of a machine, from its summary document."""
    return MachineSummaryOut(**_shown(doc), pending=doc.get("pending"))


def ipv4(raw: str, field: str) -> str:
    """``raw`` as a canonical IPv4 address, or a 422 on ``field``."""
    try:
        return str(IPv4Address(raw))
    except ValueError as err:
        raise FieldErrors.one(field, "ip", f"{raw!r} is not an IPv4 address") from err
