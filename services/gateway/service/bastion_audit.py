"""The bastion's events in the gateway's audit log, beside API actions.

``session.started``, ``session.ended``, ``transfer.done``, ``session.refused`` and
``command.blocked`` each become one audit entry: ``who`` is the bastion user, ``role``
``bastion``, ``method`` ``SSH`` or ``SFTP``, ``path`` what happened in a line, ``status`` the
exit status (0 when there is none) or 403 for a refusal, ``target`` the session, and ``event`` and
``detail`` the event's type and fields.

Delivery is at least once: the entry's ``_id`` is the envelope's id, so a redelivered event
meets the unique ``_id`` and is written once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import structlog

from libs.common.contracts import Envelope, Message
from libs.common.contracts.bastion import (
    CommandBlocked,
    SessionEnded,
    SessionRefused,
    SessionStarted,
    TransferDone,
)
from libs.common.errors import ConflictError

from ..store import GatewayStore

__all__ = ["AUDITED_EVENTS", "audit_entry", "record"]

log = structlog.get_logger("gateway.audit")

AUDITED_EVENTS: tuple[type[Message], ...] = (
    SessionStarted,
    SessionEnded,
    TransferDone,
    SessionRefused,
    CommandBlocked,
)


def _where(login: str, ip: str | None, machine_id: str | None) -> str:
    return f"{login}@{ip or machine_id or '?'}"


def _line(msg: Message) -> tuple[str, str, int, str | None, datetime | None]:
    """(method, path, status, target, at) of one bastion event."""
    if isinstance(msg, SessionStarted | SessionEnded):
        what = f"{msg.kind} {_where(msg.login, msg.ip, msg.machine_id)}"
        if msg.command:
            what += f" {msg.command}"
        if isinstance(msg, SessionEnded):
            status = msg.exit_status if msg.exit_status is not None else 0
            return "SSH", f"ended ({msg.end_reason}) {what}", status, msg.session_id, msg.ended_at
        return "SSH", f"started {what}", 0, msg.session_id, msg.started_at
    if isinstance(msg, TransferDone):
        where = _where(msg.login, msg.ip, msg.machine_id)
        path = f"{msg.direction} {where}:{msg.path} ({msg.size} bytes)"
        return "SFTP", path, 0, msg.session_id, msg.at
    if isinstance(msg, SessionRefused):
        return "SSH", f"refused ({msg.reason}) {msg.target or ''}".strip(), 403, msg.target, msg.at
    if isinstance(msg, CommandBlocked):
        where = _where(msg.login, msg.ip, msg.machine_id)
        path = f"blocked {where} {msg.command}"
        return "SSH", path, 403, msg.session_id, msg.at
    raise TypeError(f"{msg.TYPE} is not a bastion event the audit log records")


def audit_entry(msg: Message, envelope: Envelope) -> dict[str, Any]:
    """The audit entry of one bastion event."""
    method, path, status, target, at = _line(msg)
    return {
        "_id": f"bastion:{envelope.id}",
        "at": at or envelope.occurred_at,
        "who": getattr(msg, "user", "?"),
        "role": "bastion",
        "method": method,
        "path": path[:1000],
        "status": status,
        "target": target,
        "event": msg.TYPE,
        "detail": msg.model_dump(mode="json"),
    }


async def record(store: GatewayStore, msg: Message, envelope: Envelope) -> None:
    """Write the event's audit entry once (a redelivery finds it written)."""
    try:
        await store.audit_write(audit_entry(msg, envelope))
    except ConflictError:
        log.debug("bastion event already audited", type=msg.TYPE, id=envelope.id)
