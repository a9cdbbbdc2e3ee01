"""Settings of the imagesync service (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator

from libs.common.settings import CommonSettings

__all__ = ["ImagesyncSettings", "RegistryEndpoint", "parse_registries"]


@dataclass(frozen=True, slots=True)
class RegistryEndpoint:
    """One dc's registry: its base URL and optional credentials (from the URL's userinfo)."""

    dc: str
    url: str  # scheme://host:port, no trailing slash, no credentials
    username: str | None = None
    password: str | None = None

    @property
    def host(self) -> str:
        """``host:port`` as it appears in image references."""
        return urlsplit(self.url).netloc


def parse_registries(raw: str) -> list[RegistryEndpoint]:
    """Parse ``dc1=http://h:5001,dc2=http://user:pw@h:5002`` into endpoints (order kept)."""
    out: list[RegistryEndpoint] = []
    for item in filter(None, (p.strip() for p in raw.split(","))):
        dc, sep, url = item.partition("=")
        dc, url = dc.strip(), url.strip()
        if not sep or not dc or not url:
            raise ValueError(f"expected dc=url, got {item!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{dc}: not an http(s) URL: {url!r}")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        out.append(
            RegistryEndpoint(
                dc=dc,
                url=urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")),
                username=unquote(parts.username) if parts.username else None,
                password=unquote(parts.password) if parts.password else None,
            )
        )
    names = [r.dc for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"a dc is named twice: {names}")
    return out


class ImagesyncSettings(CommonSettings):
    """imagesync settings; ``DOCKVM_IMAGESYNC_PORT`` sets its HTTP port."""

    port: int = Field(default=8081, ge=1, le=65535, validation_alias="DOCKVM_IMAGESYNC_PORT")
    registries: str = Field(
        default="dc1=http://127.0.0.1:5001,dc2=http://127.0.0.1:5002",
        description="the topology: dc=url pairs; credentials may sit in the URL's userinfo",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="the registries' notification bearer secret; "
        "default: the contents of $DOCKVM_STATE_DIR/webhook.secret",
    )
    reconcile_interval_s: float = Field(default=300.0, gt=0)
    # How long one registry's answer to ``GET /v1/registries`` (per prefix) is kept and shared:
    # the console refreshes every few seconds, and each listing HEADs every tag.
    catalog_cache_s: float = Field(default=5.0, ge=0, le=300)
    # How long the repository names of a registry's catalog are kept: the walk behind
    # ``/v2/_catalog`` takes seconds on S3. Pushes and copies seen on the bus add their
    # repository at once; the catalog reconcile walks again every ``reconcile_interval_s``.
    catalog_names_s: float = Field(default=60.0, ge=0, le=3600)
    sync_attempts: int = Field(default=6, ge=1, le=100)
    sync_backoff_initial_s: float = Field(default=0.5, gt=0)
    sync_backoff_max_s: float = Field(default=30.0, gt=0)
    max_concurrent_jobs: int = Field(default=4, ge=1, le=64)
    blob_concurrency: int = Field(default=6, ge=1, le=32)
    registry_timeout_s: float = Field(default=30.0, gt=0)

    @field_validator("registries")
    @classmethod
    def _valid_topology(cls, v: str) -> str:
        parse_registries(v)
        return v

    def topology(self) -> list[RegistryEndpoint]:
        """The configured registries, in order."""
        return parse_registries(self.registries)
