"""The CLI's HTTP client of the gateway, and how a problem+json answer becomes a message."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import aiohttp

__all__ = ["ApiError", "GatewayClient", "Transport", "format_problem"]


class ApiError(Exception):
    """The gateway answered with an error (or could not be reached)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(format_problem(status, body))
        self.status = status
        self.body = body


def format_problem(status: int, body: Any) -> str:
    """One readable paragraph from an RFC 9457 problem (with each failing field)."""
    if not isinstance(body, dict):
        return f"HTTP {status}: {body}"
    lines = [f"{body.get('title', 'error')} ({status})"
             + (f": {body['detail']}" if body.get("detail") and not body.get("errors") else "")]
    for err in body.get("errors") or []:
        lines.append(f"  {err.get('field')}: {err.get('message')}")
    return "\n".join(lines)


class Transport(Protocol):
    """Port: one HTTP exchange with the gateway."""

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """Return the status and the decoded JSON body (None when empty; the text of an
        asciicast recording)."""
        ...


class GatewayClient:
    """aiohttp :class:`Transport` with the bearer token."""

    def __init__(self, url: str, token: str | None, timeout: float = 60.0) -> None:
        self.url = url
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GatewayClient:
        self._session = aiohttp.ClientSession(
            self.url, headers=self._headers, timeout=self._timeout
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One request; connection failures become :class:`ApiError` with status 0."""
        assert self._session is not None
        clean = {k: str(v) for k, v in (params or {}).items() if v is not None}
        try:
            async with self._session.request(
                method, path, json=json, params=clean, headers=headers
            ) as r:
                if r.content_type == "application/x-asciicast":
                    return r.status, await r.text()  # a recording: JSON lines, not one value
                body = await r.json(content_type=None) if r.content_length != 0 else None
                return r.status, body
        except aiohttp.ClientConnectionError as err:
            raise ApiError(0, f"cannot reach the gateway at {self.url}: {err}") from err

    async def stream(self, path: str) -> AsyncIterator[str]:
        """The lines of a streamed text answer as they come (a build's log); no total timeout."""
        assert self._session is not None
        try:
            async with self._session.get(path, timeout=aiohttp.ClientTimeout(total=None)) as r:
                if r.status != 200:
                    raise ApiError(r.status, await r.json(content_type=None))
                async for line in r.content:
                    yield line.decode(errors="replace")
        except aiohttp.ClientConnectionError as err:
            raise ApiError(0, f"cannot reach the gateway at {self.url}: {err}") from err
