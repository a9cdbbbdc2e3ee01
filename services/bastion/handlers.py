"""Bus entrypoints of the bastion: its admin RPCs, thin translations between the contracts in
:mod:`libs.common.contracts.bastion` and the :class:`~services.bastion.service.Admin` use cases.

Delivery guarantee: at least once through the consumer wrapper, without dedupe (every handler
is a read or idempotent: users by name, grants by the caller's id, removals by what they
remove). A refused request is answered with ``bastion.rejected`` and is never dead-lettered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from libs.common.bus import Handler, MessageContext
from libs.common.clock import utcnow
from libs.common.contracts.bastion import (
    BastionRejected,
    CaGet,
    CaInfo,
    GrantAdd,
    GrantInfo,
    GrantList,
    GrantListing,
    GrantRevoke,
    GrantRevoked,
    RecordingChunk,
    RecordingGet,
    RuleAdd,
    RuleInfo,
    RuleList,
    RuleListing,
    RuleRemove,
    RuleRemoved,
    SessionEnd,
    SessionEndRequested,
    SessionGet,
    SessionInfo,
    SessionList,
    SessionListing,
    UserAdd,
    UserInfo,
    UserList,
    UserListing,
    UserRemove,
    UserRemoved,
)
from libs.common.contracts.envelope import Message
from libs.common.errors import DomainError

from .documents import GrantDoc, RuleDoc, SessionDoc, UserDoc
from .keys import BastionKeys
from .service import Admin

__all__ = ["BINDINGS", "handlers"]

BINDINGS = ("bastion.#",)


def _rejected(err: DomainError) -> BastionRejected:
    text = str(err)
    head, sep, _ = text.partition(":")
    field = head if sep and " " not in head else None
    reason = err.reason if err.reason in ("not_found", "conflict") else "invalid"
    return BastionRejected(reason=reason, detail=text, field=field)  # type: ignore[arg-type]


def user_info(doc: UserDoc) -> UserInfo:
    """A stored user as the contract shows it."""
    return UserInfo(
        name=doc["_id"],
        ssh_keys=doc["keys"],
        fingerprints=doc["fingerprints"],
        created_at=doc["created_at"],
        updated_at=doc["updated_at"],
    )


def grant_info(doc: GrantDoc) -> GrantInfo:
    """A stored grant as the contract shows it."""
    return GrantInfo(
        id=doc["_id"],
        user=doc["user"],
        app=doc["app"],
        machine_id=doc["machine_id"],
        login=doc["login"],
        record_input=doc["record_input"],
        created_at=doc["created_at"],
        expires_at=doc["expires_at"],
        active=doc["expires_at"] > utcnow(),
    )


def session_info(doc: SessionDoc, live: bool) -> SessionInfo:
    """A stored session as the contract shows it (``live``: still running here)."""
    fields = {k: v for k, v in doc.items() if k not in ("_id", "owner", "live")}
    fields["recording_size"] = doc.get("recording_size", 0)
    return SessionInfo(id=doc["_id"], live=live, **fields)  # type: ignore[arg-type]


def rule_info(doc: RuleDoc) -> RuleInfo:
    """A stored rule as the contract shows it."""
    return RuleInfo(
        id=doc["_id"],
        pattern=doc["pattern"],
        description=doc["description"],
        created_at=doc["created_at"],
    )


async def user_add(admin: Admin, msg: UserAdd, ctx: MessageContext) -> Message:
    """``bastion.user.add`` → ``bastion.user``."""
    return user_info(await admin.add_user(msg.name, list(msg.ssh_keys)))


async def user_list(admin: Admin, msg: UserList, ctx: MessageContext) -> Message:
    """``bastion.user.list`` → ``bastion.user.listing``."""
    return UserListing(users=[user_info(u) for u in await admin.list_users()])


async def user_remove(admin: Admin, msg: UserRemove, ctx: MessageContext) -> Message:
    """``bastion.user.remove`` → ``bastion.user.removed``."""
    grants, sessions = await admin.remove_user(msg.name)
    return UserRemoved(name=msg.name, grants_revoked=grants, sessions_ended=sessions)


async def grant_add(admin: Admin, msg: GrantAdd, ctx: MessageContext) -> Message:
    """``bastion.grant.add`` → ``bastion.grant``."""
    doc = await admin.add_grant(
        msg.user,
        app=msg.app,
        machine_id=msg.machine_id,
        login=msg.login,
        ttl_s=msg.ttl_s,
        record_input=msg.record_input,
        grant_id=msg.id,
    )
    return grant_info(doc)


async def grant_list(admin: Admin, msg: GrantList, ctx: MessageContext) -> Message:
    """``bastion.grant.list`` → ``bastion.grant.listing``."""
    grants = await admin.list_grants(msg.user, msg.include_expired)
    return GrantListing(grants=[grant_info(g) for g in grants])


async def grant_revoke(admin: Admin, msg: GrantRevoke, ctx: MessageContext) -> Message:
    """``bastion.grant.revoke`` → ``bastion.grant.revoked``."""
    return GrantRevoked(id=msg.id, sessions_ended=await admin.revoke_grant(msg.id))


async def session_list(admin: Admin, msg: SessionList, ctx: MessageContext) -> Message:
    """``bastion.session.list`` → ``bastion.session.listing``."""
    flt = {
        "user": msg.user,
        "ip": msg.ip,
        "machine_id": msg.machine_id,
        "since": msg.since,
        "until": msg.until,
        "live": True if msg.live_only else None,
    }
    docs = await admin.list_sessions(flt, msg.limit)
    return SessionListing(sessions=[session_info(d, d["live"]) for d in docs])


async def session_get(admin: Admin, msg: SessionGet, ctx: MessageContext) -> Message:
    """``bastion.session.get`` → ``bastion.session``."""
    doc = await admin.get_session(msg.id)
    return session_info(doc, doc["live"])


async def session_end(admin: Admin, msg: SessionEnd, ctx: MessageContext) -> Message:
    """``bastion.session.end`` → ``bastion.session.end_requested``."""
    return SessionEndRequested(id=msg.id, was_live=await admin.end_session(msg.id))


async def recording_get(admin: Admin, msg: RecordingGet, ctx: MessageContext) -> Message:
    """``bastion.recording.get`` → ``bastion.recording.chunk``."""
    piece = await admin.recording(msg.session_id, msg.offset, msg.limit)
    return RecordingChunk(
        session_id=msg.session_id,
        path=piece.path,
        offset=piece.offset,
        next_offset=piece.next_offset,
        size=piece.size,
        data=piece.data.decode("ascii", "replace"),
        eof=piece.eof,
        live=piece.live,
    )


async def rule_add(admin: Admin, msg: RuleAdd, ctx: MessageContext) -> Message:
    """``bastion.rule.add`` → ``bastion.rule``."""
    return rule_info(await admin.add_rule(msg.pattern, msg.description))


async def rule_list(admin: Admin, msg: RuleList, ctx: MessageContext) -> Message:
    """``bastion.rule.list`` → ``bastion.rule.listing``."""
    return RuleListing(rules=[rule_info(r) for r in await admin.list_rules()])


async def rule_remove(admin: Admin, msg: RuleRemove, ctx: MessageContext) -> Message:
    """``bastion.rule.remove`` → ``bastion.rule.removed``."""
    await admin.remove_rule(msg.id)
    return RuleRemoved(id=msg.id)


async def ca_get(keys: BastionKeys, msg: CaGet, ctx: MessageContext) -> Message:
    """``bastion.ca.get`` → ``bastion.ca``."""
    return CaInfo(
        public_key=keys.ca_public_line(),
        path=str(keys.ca_public_path),
        fingerprint=keys.ca.get_fingerprint(),
    )


_ADMIN: dict[str, Callable[[Admin, Any, MessageContext], Awaitable[Message]]] = {
    UserAdd.TYPE: user_add,
    UserList.TYPE: user_list,
    UserRemove.TYPE: user_remove,
    GrantAdd.TYPE: grant_add,
    GrantList.TYPE: grant_list,
    GrantRevoke.TYPE: grant_revoke,
    SessionList.TYPE: session_list,
    SessionGet.TYPE: session_get,
    SessionEnd.TYPE: session_end,
    RecordingGet.TYPE: recording_get,
    RuleAdd.TYPE: rule_add,
    RuleList.TYPE: rule_list,
    RuleRemove.TYPE: rule_remove,
}


def _answering(fn: Callable[..., Awaitable[Message]], *bound: Any) -> Handler:
    """Bind ``fn``'s dependencies; a refusal becomes a ``bastion.rejected`` reply."""

    async def handler(msg: Any, ctx: MessageContext) -> Message:
        try:
            return await fn(*bound, msg, ctx)
        except DomainError as err:
            return _rejected(err)

    return handler


def handlers(admin: Admin, keys: BastionKeys) -> dict[str, Handler]:
    """The handler table of the ``bastion`` queue."""
    table = {t: _answering(fn, admin) for t, fn in _ADMIN.items()}
    table[CaGet.TYPE] = _answering(ca_get, keys)
    return table
