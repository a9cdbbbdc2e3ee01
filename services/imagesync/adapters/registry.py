"""A Registry HTTP API V2 client on aiohttp: the real :class:`~services.imagesync.ports.Registry`.

It speaks to Distribution-compatible registries: basic auth and the bearer-token flow (tokens
cached per scope), manifests of every supported type, blob existence, cross-repository mounts
and streamed uploads (chunked PATCH, then PUT with the digest) whose sha256 is checked before
the upload is committed. Library errors leave as dockvm errors: 5xx/429, timeouts and lost
connections are :class:`TransientError`; a 404 is :class:`NotFoundError`; other refusals are
:class:`DomainError` with the registry's own message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from yarl import URL

from libs.common.errors import DomainError, NotFoundError, TransientError

from ..domain import MANIFEST_TYPES, USER_AGENT, Manifest, digest_of
from ..settings import RegistryEndpoint

__all__ = ["DigestMismatch", "HttpRegistry", "RegistryUnauthorized", "new_session"]

log = structlog.get_logger("imagesync.registry")
CHUNK = 1 << 20
_ACCEPT = ", ".join(sorted(MANIFEST_TYPES))
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


class DigestMismatch(TransientError):
    """Bytes read did not hash to their digest (a truncated or corrupted transfer)."""


class RegistryUnauthorized(DomainError):
    """The registry refused our credentials."""

    reason = "unauthorized"
    status = 401


def new_session(
    timeout_s: float, connections: int = 32, user_agent: str = USER_AGENT
) -> aiohttp.ClientSession:
    """The HTTP session of all registry clients: no decompression, bounded read timeout.

    The user agent marks our pushes, so their notifications are not replicated again.
    """
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=timeout_s),
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=connections),
        headers={"User-Agent": user_agent},
        auto_decompress=False,
    )


@dataclass(slots=True)
class _Stream:
    size: int | None
    _resp: aiohttp.ClientResponse

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_chunked(CHUNK):
                yield chunk
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise TransientError(f"blob download interrupted: {err!r}") from err


def _repo_scope(repo: str, actions: str = "pull") -> str:
    return f"repository:{repo}:{actions}"


class HttpRegistry:
    """One registry, reached over HTTP(S) through a shared aiohttp session."""

    def __init__(self, endpoint: RegistryEndpoint, session: aiohttp.ClientSession) -> None:
        self.dc = endpoint.dc
        self.host = endpoint.host
        self._base = URL(endpoint.url)
        self._session = session
        self._basic = (
            aiohttp.encode_basic_auth(endpoint.username, endpoint.password or "")
            if endpoint.username
            else None
        )
        self._use_basic = False
        self._tokens: dict[tuple[str, ...], str] = {}

    def __repr__(self) -> str:
        return f"HttpRegistry({self.dc}={self._base})"

    # --- plumbing -----------------------------------------------------------------------

    def _url(self, path: str) -> URL:
        return self._base.with_path(self._base.path.rstrip("/") + path)

    def _auth_headers(self, scopes: tuple[str, ...]) -> dict[str, str]:
        token = self._tokens.get(scopes)
        if token is not None:
            return {"Authorization": f"Bearer {token}"}
        if self._use_basic and self._basic is not None:
            return {"Authorization": self._basic}
        return {}

    async def _authenticate(self, challenge: str, scopes: tuple[str, ...]) -> None:
        """Answer a 401 challenge: switch to basic auth, or fetch a bearer token."""
        scheme, _, params_raw = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self._basic is None:
                raise RegistryUnauthorized(f"{self.dc}: registry wants basic auth, no credentials")
            if self._use_basic:
                raise RegistryUnauthorized(f"{self.dc}: registry refused our basic credentials")
            self._use_basic = True
            return
        if scheme.lower() != "bearer":
            raise RegistryUnauthorized(f"{self.dc}: unsupported auth challenge {challenge!r}")
        params = dict(_CHALLENGE_RE.findall(params_raw))
        realm = params.get("realm")
        if not realm:
            raise RegistryUnauthorized(f"{self.dc}: bearer challenge without realm")
        wanted = list(dict.fromkeys([*params.get("scope", "").split(" "), *scopes]))
        query: list[tuple[str, str]] = [("scope", s) for s in wanted if s]
        if params.get("service"):
            query.insert(0, ("service", params["service"]))
        try:
            headers = {"Authorization": self._basic} if self._basic else {}
            async with self._session.get(URL(realm).extend_query(query), headers=headers) as resp:
                if resp.status in (401, 403):
                    raise RegistryUnauthorized(
                        f"{self.dc}: token service refused us ({resp.status})"
                    )
                if resp.status >= 500:
                    raise TransientError(f"{self.dc}: token service answered {resp.status}")
                if resp.status != 200:
                    raise DomainError(
                        f"{self.dc}: token service answered {resp.status}", reason="auth_failed"
                    )
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise TransientError(f"{self.dc}: token service unreachable: {err!r}") from err
        token = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not token:
            raise DomainError(f"{self.dc}: token service sent no token", reason="auth_failed")
        self._tokens[scopes] = token

    @asynccontextmanager
    async def _request(
        self,
        method: str,
        url: URL,
        scopes: Iterable[str],
        *,
        headers: dict[str, str] | None = None,
        data: Any = None,
        replayable: bool = True,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send one request, answering a 401 challenge once (only if the body can be re-sent)."""
        key = tuple(scopes)
        try:
            for attempt in range(2):
                hdrs = {**self._auth_headers(key), **(headers or {})}
                async with self._session.request(
                    method, url, headers=hdrs, data=data, allow_redirects=True
                ) as resp:
                    if resp.status == 401:
                        challenge = resp.headers.get("WWW-Authenticate", "")
                        self._tokens.pop(key, None)
                        if attempt == 0 and replayable and challenge:
                            await self._authenticate(challenge, key)
                            continue
                        if not replayable and attempt == 0:
                            raise TransientError(f"{self.dc}: credentials expired mid-upload")
                        raise RegistryUnauthorized(
                            f"{self.dc}: {method} {url.path} unauthorized: "
                            f"{await _error_text(resp)}"
                        )
                    yield resp
                    return
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise TransientError(f"{self.dc}: {method} {url.path} failed: {err!r}") from err

    async def _fail(self, resp: aiohttp.ClientResponse, what: str) -> DomainError | TransientError:
        text = await _error_text(resp)
        msg = f"{self.dc}: {what}: HTTP {resp.status}: {text}"
        if resp.status >= 500 or resp.status == 429:
            return TransientError(msg)
        if resp.status == 404:
            return NotFoundError(msg)
        if resp.status == 403:
            return RegistryUnauthorized(msg)
        return DomainError(msg, reason="registry_rejected")

    # --- manifests ----------------------------------------------------------------------

    async def manifest_digest(self, repo: str, reference: str) -> str | None:
        """HEAD the manifest; None when the registry does not have it."""
        url = self._url(f"/v2/{repo}/manifests/{reference}")
        async with self._request(
            "HEAD", url, (_repo_scope(repo),), headers={"Accept": _ACCEPT}
        ) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise await self._fail(resp, f"HEAD manifest {repo}:{reference}")
            digest = resp.headers.get("Docker-Content-Digest")
        if digest is None:  # some registries only give it on GET
            return (await self.get_manifest(repo, reference)).digest
        return digest

    async def get_manifest(self, repo: str, reference: str) -> Manifest:
        """GET the manifest and check its bytes against the digest asked or announced."""
        url = self._url(f"/v2/{repo}/manifests/{reference}")
        async with self._request(
            "GET", url, (_repo_scope(repo),), headers={"Accept": _ACCEPT}
        ) as resp:
            if resp.status != 200:
                raise await self._fail(resp, f"GET manifest {repo}:{reference}")
            raw = await resp.read()
            media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
            announced = resp.headers.get("Docker-Content-Digest")
        manifest = Manifest(media_type, raw)
        expected = reference if reference.startswith("sha256:") else announced
        if expected is not None and manifest.digest != expected:
            raise DigestMismatch(
                f"{self.dc}: manifest {repo}@{expected} hashes to {manifest.digest}"
            )
        return manifest

    async def put_manifest(self, repo: str, reference: str, manifest: Manifest) -> str:
        """PUT the exact manifest bytes; check the digest the registry computed."""
        url = self._url(f"/v2/{repo}/manifests/{reference}")
        async with self._request(
            "PUT",
            url,
            (_repo_scope(repo, "pull,push"),),
            headers={"Content-Type": manifest.media_type},
            data=manifest.raw,
        ) as resp:
            if resp.status not in (200, 201):
                raise await self._fail(resp, f"PUT manifest {repo}:{reference}")
            digest = resp.headers.get("Docker-Content-Digest", manifest.digest)
        if digest != manifest.digest:
            raise DigestMismatch(
                f"{self.dc}: stored manifest {repo}:{reference} as {digest}, "
                f"expected {manifest.digest}"
            )
        return digest

    # --- blobs --------------------------------------------------------------------------

    async def blob_exists(self, repo: str, digest: str) -> bool:
        """HEAD the blob."""
        url = self._url(f"/v2/{repo}/blobs/{digest}")
        async with self._request("HEAD", url, (_repo_scope(repo),)) as resp:
            if resp.status == 404:
                return False
            if resp.status != 200:
                raise await self._fail(resp, f"HEAD blob {repo}@{digest}")
            return True

    async def _start_upload(
        self, repo: str, *, mount: str | None = None, from_repo: str | None = None
    ) -> tuple[bool, URL | None]:
        """POST an upload (a mount when asked); return (mounted, upload location)."""
        url = self._url(f"/v2/{repo}/blobs/uploads/")
        scopes: tuple[str, ...] = (_repo_scope(repo, "pull,push"),)
        if mount and from_repo:
            url = url.with_query({"mount": mount, "from": from_repo})
            scopes = (*scopes, _repo_scope(from_repo))
        async with self._request("POST", url, scopes, headers={"Content-Length": "0"}) as resp:
            if resp.status == 201:
                return True, None
            if resp.status != 202:
                raise await self._fail(resp, f"start upload {repo}")
            return False, self._location(resp)

    def _location(self, resp: aiohttp.ClientResponse) -> URL:
        loc = resp.headers.get("Location")
        if not loc:
            raise DomainError(f"{self.dc}: upload answer without Location", reason="bad_registry")
        return self._base.join(URL(loc, encoded=True))

    async def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Ask for a cross-repository mount; False (and no upload left open) if refused."""
        mounted, location = await self._start_upload(repo, mount=digest, from_repo=from_repo)
        if location is not None:
            await self._cancel(location, repo)
        return mounted

    async def _cancel(self, location: URL, repo: str) -> None:
        try:
            async with self._request("DELETE", location, (_repo_scope(repo, "pull,push"),)) as resp:
                resp.release()
        except TransientError:
            pass  # the registry purges abandoned uploads itself

    @asynccontextmanager
    async def open_blob(self, repo: str, digest: str) -> AsyncIterator[_Stream]:
        """GET the blob (following a redirect to its storage) for streaming."""
        url = self._url(f"/v2/{repo}/blobs/{digest}")
        async with self._request("GET", url, (_repo_scope(repo),)) as resp:
            if resp.status != 200:
                raise await self._fail(resp, f"GET blob {repo}@{digest}")
            yield _Stream(resp.content_length, resp)

    async def upload_blob(
        self, repo: str, digest: str, chunks: AsyncIterator[bytes], size: int | None = None
    ) -> int:
        """Stream ``chunks`` (chunked PATCH), check their sha256, then commit with PUT."""
        _, location = await self._start_upload(repo)
        if location is None:  # 201 to an upload that asked for no mount: not the protocol
            raise DomainError(f"{self.dc}: upload to {repo} answered 201", reason="bad_registry")
        hasher = hashlib.sha256()
        sent = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal sent
            async for chunk in chunks:
                hasher.update(chunk)
                sent += len(chunk)
                yield chunk

        scopes = (_repo_scope(repo, "pull,push"),)
        try:
            async with self._request(
                "PATCH",
                location,
                scopes,
                headers={"Content-Type": "application/octet-stream"},
                data=body(),
                replayable=False,
            ) as resp:
                if resp.status != 202:
                    raise await self._fail(resp, f"upload {repo}@{digest}")
                location = self._location(resp)
            actual = "sha256:" + hasher.hexdigest()
            if actual != digest:
                raise DigestMismatch(f"{self.dc}: blob {digest} read as {actual} ({sent} bytes)")
            if size is not None and sent != size:
                raise DigestMismatch(f"{self.dc}: blob {digest} is {sent} bytes, expected {size}")
            async with self._request(
                "PUT",
                location.update_query(digest=digest),
                scopes,
                headers={"Content-Length": "0"},
            ) as resp:
                if resp.status not in (201, 204):
                    raise await self._fail(resp, f"commit {repo}@{digest}")
        except BaseException:
            await self._cancel(location, repo)
            raise
        return sent

    # --- listing ------------------------------------------------------------------------

    async def _paged(self, path: str, key: str, scopes: tuple[str, ...]) -> list[str]:
        url: URL | None = self._url(path).with_query({"n": "1000"})
        out: list[str] = []
        while url is not None:
            async with self._request("GET", url, scopes) as resp:
                if resp.status == 404:
                    return out
                if resp.status != 200:
                    raise await self._fail(resp, f"GET {url.path}")
                body = await resp.json(content_type=None)
                out.extend((body or {}).get(key) or [])
                nxt = resp.links.get("next", {}).get("url")
            url = self._base.join(URL(str(nxt))) if nxt else None
        return out

    async def catalog(self) -> list[str]:
        """Every repository, following pagination."""
        return await self._paged("/v2/_catalog", "repositories", ("registry:catalog:*",))

    async def tags(self, repo: str) -> list[str]:
        """Every tag of ``repo`` (none when the repository is unknown)."""
        return await self._paged(f"/v2/{repo}/tags/list", "tags", (_repo_scope(repo),))

    # --- helpers for tests and the benchmark --------------------------------------------

    async def push_blob(self, repo: str, data: bytes) -> str:
        """Upload ``data`` as a blob in one request; return its digest."""
        digest = digest_of(data)
        _, location = await self._start_upload(repo)
        if location is None:  # 201 to an upload that asked for no mount: not the protocol
            raise DomainError(f"{self.dc}: upload to {repo} answered 201", reason="bad_registry")
        async with self._request(
            "PUT",
            location.update_query(digest=digest),
            (_repo_scope(repo, "pull,push"),),
            headers={"Content-Type": "application/octet-stream"},
            data=data,
        ) as resp:
            if resp.status not in (201, 204):
                raise await self._fail(resp, f"push blob {repo}")
        return digest


async def _error_text(resp: aiohttp.ClientResponse) -> str:
    try:
        body = await resp.json(content_type=None)
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors:
            return "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        return str(body)[:300]
    except Exception:
        try:
            return (await resp.text())[:300]
        except Exception:
            return resp.reason or ""
