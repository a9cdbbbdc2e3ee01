"""Who may log in, and where: keys against users, targets against machines and grants.

Every refusal is announced as ``session.refused`` (the audit log shows it) and raised as a
:class:`~services.bastion.domain.Refused` or :class:`NotFoundError` whose message is the one
line the user sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncssh
import structlog
from prometheus_client import Counter

from libs.common.bus import Publisher
from libs.common.clock import utcnow
from libs.common.contracts.bastion import SessionRefused
from libs.common.errors import DomainError, NotFoundError

from ..documents import GrantDoc, MachineView, UserDoc
from ..domain import Refused, Target, covering_grant, resolve_machine, user_has_key
from ..store import BastionStore, MachineDirectory

__all__ = ["Access", "Authorized"]

log = structlog.get_logger("bastion.access")

_REFUSED = Counter("dockvm_bastion_refusals_total", "Logins and targets refused", ["reason"])


@dataclass(frozen=True)
class Authorized:
    """A user allowed on a machine as a login, by a grant."""

    user: UserDoc
    grant: GrantDoc
    machine: MachineView
    login: str


class Access:
    """Authentication and authorization of bastion logins."""

    def __init__(
        self, store: BastionStore, machines: MachineDirectory, publisher: Publisher
    ) -> None:
        self._store = store
        self._machines = machines
        self._publisher = publisher

    async def user(self, name: str) -> UserDoc | None:
        """The registered user ``name``, or None."""
        return await self._store.get_user(name)

    async def key_allowed(self, name: str, key: asyncssh.SSHKey) -> bool:
        """True when ``key`` is one of ``name``'s keys."""
        user = await self._store.get_user(name)
        return user is not None and user_has_key(user, key)

    async def authorize(self, name: str, target: Target) -> Authorized:
        """Check that ``name`` may log in ``target`` now; raise a refusal otherwise."""
        user = await self._store.get_user(name)
        if user is None:
            raise Refused(f"unknown user {name!r}", reason="unknown_user")
        try:
            machine = resolve_machine(target, await self._machines.named(target.name))
        except NotFoundError as err:
            raise Refused(str(err), reason="unknown_machine") from err
        grants = await self._store.list_grants(name)
        grant = covering_grant(user, grants, machine, target.login, utcnow())
        return Authorized(user, grant, machine, target.login or grant["login"])

    async def reachable(self, name: str) -> list[tuple[MachineView, GrantDoc]]:
        """The machines ``name`` may reach now, each with the grant that covers it."""
        user = await self._store.get_user(name)
        if user is None:
            return []
        now = utcnow()
        grants = [
            g
            for g in await self._store.list_grants(name)
            if g["expires_at"] > now and g.get("user_uid") == user["uid"]
        ]
        apps = sorted({g["app"] for g in grants if g.get("app")})
        ids = sorted({g["machine_id"] for g in grants if g.get("machine_id")})
        out = []
        for m in await self._machines.of(apps, ids):
            try:
                out.append((m, covering_grant(user, grants, m, None, now)))
            except Refused:
                continue
        return out

    async def refused(
        self,
        user: str,
        err: DomainError,
        *,
        target: str | None = None,
        machine_id: str | None = None,
        client_addr: str | None = None,
    ) -> None:
        """Announce a refusal (never raises: the user still gets her line)."""
        reason = err.reason if err.reason not in ("not_found", "invalid") else "bad_target"
        log.info("login refused", user=user, reason=reason, detail=str(err), target=target)
        _REFUSED.labels(reason).inc()
        try:
            await self._publisher.publish(
                SessionRefused(
                    user=user[:64],
                    reason=reason,
                    detail=str(err)[:500],
                    target=target,
                    machine_id=machine_id,
                    client_addr=client_addr,
                    at=utcnow(),
                )
            )
        except Exception as exc:
            log.warning("refusal not announced", error=repr(exc))
