"""What each dc's registry holds under a tag: one ``HEAD`` of the manifest (Distribution API)."""

from __future__ import annotations

import aiohttp

from libs.common.errors import TransientError

__all__ = ["HttpRegistries"]

_ACCEPT = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    )
)


class HttpRegistries:
    """:class:`~services.builder.ports.Registries` over HTTP (``{dc: host:port}``)."""

    def __init__(self, hosts: dict[str, str], session: aiohttp.ClientSession) -> None:
        self.hosts = hosts
        self._session = session

    async def digest(self, dc: str, repo: str, tag: str) -> str | None:
        """The manifest digest of ``repo:tag`` in ``dc``'s registry, or None."""
        url = f"http://{self.hosts[dc]}/v2/{repo}/manifests/{tag}"
        try:
            async with self._session.head(url, headers={"Accept": _ACCEPT}) as r:
                if r.status == 404:
                    return None
                if r.status != 200:
                    raise TransientError(f"{dc} registry answered {r.status} for {repo}:{tag}")
                return r.headers.get("Docker-Content-Digest")
        except aiohttp.ClientError as err:
            raise TransientError(f"{dc} registry: {err}") from err
