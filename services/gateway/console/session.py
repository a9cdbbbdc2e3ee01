"""The console's session cookie and its CSRF tokens: pure functions, no I/O.

The cookie holds ``<nonce>.<bearer token>``: HttpOnly (no script reads it), SameSite=Strict (no
other site's page sends it) and scoped to ``/ui``. Every form carries the session's CSRF token,
an HMAC of the login's random nonce keyed by the bearer token: a page of another origin can
neither read it nor compute it, and it changes at each login. Nothing is kept on the server, so
a restart or another gateway replica accepts the same session. Before login there is no token:
the login form is protected by a double-submitted random nonce (a cookie and a field).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COOKIE",
    "CSRF_FIELD",
    "LOGIN_COOKIE",
    "MAX_AGE_S",
    "Session",
    "cookie_options",
    "csrf_valid",
    "login_nonce",
    "new_session",
    "parse_session",
]

COOKIE = "dvm_console"
LOGIN_COOKIE = "dvm_console_login"
CSRF_FIELD = "csrf"
# A console session lasts a working day; the token itself stays valid until revoked.
MAX_AGE_S = 12 * 3600
_CSRF_CONTEXT = b"dockvm-console-csrf:"


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in browser: its bearer token and the login's nonce."""

    token: str
    nonce: str

    @property
    def csrf(self) -> str:
        """The CSRF token every form of this session carries."""
        mac = hmac.new(self.token.encode(), _CSRF_CONTEXT + self.nonce.encode(), hashlib.sha256)
        return mac.hexdigest()

    @property
    def cookie(self) -> str:
        """The cookie's value."""
        return f"{self.nonce}.{self.token}"


def new_session(token: str) -> Session:
    """A session for ``token`` with a fresh nonce (a new login, a new CSRF token)."""
    return Session(token=token.strip(), nonce=secrets.token_urlsafe(16))


def parse_session(value: str | None) -> Session | None:
    """The session a cookie value holds, or None if it is missing or malformed."""
    if not value:
        return None
    nonce, dot, token = value.partition(".")
    if not dot or not nonce or not token or any(c.isspace() for c in value):
        return None
    return Session(token=token, nonce=nonce)


def csrf_valid(session: Session | None, given: str | None) -> bool:
    """Whether a form's CSRF field is this session's (constant-time compare)."""
    if session is None or not given:
        return False
    return hmac.compare_digest(session.csrf.encode(), given.encode())


def login_nonce() -> str:
    """A fresh nonce for the login form's double submit."""
    return secrets.token_urlsafe(16)


def cookie_options(*, secure: bool, max_age: int = MAX_AGE_S) -> dict[str, Any]:
    """The attributes of every console cookie (``secure`` when served over HTTPS)."""
    return {
        "httponly": True,
        "samesite": "Strict",
        "path": "/ui",
        "secure": secure,
        "max_age": max_age,
    }
