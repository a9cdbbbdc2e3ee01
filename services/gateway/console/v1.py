"""The console's one way to read and act: the gateway's own ``/v1`` API, over loopback HTTP,
with the browser's bearer token.

Every page and every button goes through the same route wrapper as the CLI (token, role,
scope, validation, audit), so the console can show and do exactly what the API allows that
token and nothing more. A request that did not reach the API is a :class:`TransientError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from libs.common.errors import TransientError

__all__ = ["V1", "Reply", "api_base"]


@dataclass(frozen=True, slots=True)
class Reply:
    """An API answer: its status and JSON body (a problem document on an error)."""

    status: int
    body: Any

    @property
    def ok(self) -> bool:
        """A 2xx answer."""
        return 200 <= self.status < 300

    @property
    def detail(self) -> str:
        """A problem's detail (or title) for a page's message."""
        if isinstance(self.body, dict):
            return str(self.body.get("detail") or self.body.get("title") or self.status)
        return str(self.body or self.status)


def api_base(bind_host: str, port: int) -> str:
    """The URL the gateway answers on from inside its own process."""
    host = "127.0.0.1" if bind_host in ("", "0.0.0.0", "::") else bind_host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class V1:
    """A client of the ``/v1`` API on behalf of one browser's token."""

    def __init__(self, base: str, timeout_s: float = 60.0) -> None:
        self._base = base
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the connection pool."""
        self._http = aiohttp.ClientSession(self._base, timeout=self._timeout)

    async def close(self) -> None:
        """Close the connection pool."""
        if self._http is not None:
            await self._http.close()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise TransientError("the console's API client is not started yet")
        return self._http

    async def call(
        self,
        token: str,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
    ) -> Reply:
        """``method path`` as the token's holder; the answer whatever its status."""
        http = self._session()
        headers = {"Authorization": f"Bearer {token}"}
        data = None if body is None else json.dumps(body)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with http.request(
                method, path, params=params, data=data, headers=headers
            ) as resp:
                raw = await resp.read()
                return Reply(resp.status, _decode(raw, resp.content_type))
        except (aiohttp.ClientError, TimeoutError) as err:
            raise TransientError(f"the API did not answer {method} {path}: {err}") from err

    async def raw(self, token: str, path: str) -> tuple[int, bytes, str]:
        """A GET whose body is not JSON (a recording): status, bytes, content type."""
        headers = {"Authorization": f"Bearer {token}"}
        try:
            async with self._session().get(path, headers=headers) as resp:
                return resp.status, await resp.read(), resp.content_type
        except (aiohttp.ClientError, TimeoutError) as err:
            raise TransientError(f"the API did not answer GET {path}: {err}") from err


def _decode(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    if "json" in content_type:
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")
    return raw.decode(errors="replace")
