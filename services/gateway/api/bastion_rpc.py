"""The gateway's one way to the bastion: an RPC whose refusal becomes the matching problem.

The bastion answers every admin RPC with its reply model or :class:`BastionRejected`
(``not_found`` -> 404, ``conflict`` -> 409, ``invalid`` -> 422 on the field it names). A reply of
another type means a bastion of another version answered: worth retrying, not a bug here.
"""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web

from libs.common.contracts import Message
from libs.common.contracts.bastion import BastionRejected
from libs.common.errors import ConflictError, NotFoundError, TransientError

from .deps import rpc_call
from .framework import FieldErrors

__all__ = ["ask_bastion"]

R = TypeVar("R", bound=Message)


async def ask_bastion(request: web.Request, msg: Message, expect: type[R]) -> R:
    """Send ``msg`` to the bastion; its reply, or the problem its refusal means."""
    reply = await rpc_call(request, msg)
    if isinstance(reply, expect):
        return reply
    if isinstance(reply, BastionRejected):
        detail = reply.detail or reply.reason
        if reply.reason == "not_found":
            raise NotFoundError(detail, reason="not_found")
        if reply.reason == "invalid":
            raise FieldErrors.one(reply.field or "body", "invalid", detail)
        raise ConflictError(detail, reason=reply.reason)
    raise TransientError(f"the bastion answered {msg.TYPE} with {reply.TYPE}")
