"""Health checks a release may run: an inline probe of a port, or a check ops declared.

A ``cmd`` check runs a command as root inside every machine of the app, so it is never taken
from the release itself: ops declare named checks per app (``PUT /v1/apps/{app}/checks/{name}``)
and a release names one (``check``). :func:`resolve_check` turns the name into the declared
check before the release is stored or any deploy is sent, on both edges (HTTP and the bus); an
inline ``http``/``tcp`` check probes a port from the host and runs nothing, so it stays allowed.
"""

from __future__ import annotations

from typing import Any, Protocol

from libs.common.contracts.releases import HealthCheck, ReleaseRequested
from libs.common.errors import DomainError, ValidationFailed

__all__ = ["CheckDirectory", "UndeclaredCommand", "resolve_check"]


class CheckDirectory(Protocol):
    """Port: the health checks declared for an app."""

    async def app_check(self, app: str, name: str) -> dict[str, Any] | None:
        """The declared check ``name`` of ``app`` (``type``, ``target``, ``timeout_s``)."""
        ...


class UndeclaredCommand(DomainError):
    """An inline ``cmd`` check: only a declared one may run a command in the machines."""

    reason = "undeclared_check"
    status = 403


async def resolve_check(req: ReleaseRequested, checks: CheckDirectory | None) -> ReleaseRequested:
    """``req`` with its named check resolved; refuse an unknown name and an inline ``cmd``."""
    if req.check is None:
        if req.health_check is not None and req.health_check.type == "cmd":
            raise UndeclaredCommand(
                "a cmd health check runs only if ops declared it for the app "
                f"(PUT /v1/apps/{req.app}/checks/NAME); name it with check"
            )
        return req
    found = await checks.app_check(req.app, req.check) if checks is not None else None
    if found is None:
        raise ValidationFailed(
            f"no health check {req.check!r} is declared for app {req.app!r}",
            reason="unknown_check",
        )
    check = HealthCheck(
        type=found["type"],
        target=found["target"],
        timeout_s=found["timeout_s"],
        fail_after=found.get("fail_after"),
    )
    return req.model_copy(update={"health_check": check})
