"""Settings of the builder (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pydantic import Field, field_validator

from libs.common.settings import CommonSettings

__all__ = ["BuilderSettings", "parse_registries"]


def parse_registries(raw: str) -> dict[str, str]:
    """``dc1=127.0.0.1:5001,dc2=127.0.0.1:5002`` (a scheme is dropped) into ``{dc: host:port}``."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        dc, sep, host = item.partition("=")
        host = host.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
        if not sep or not dc.strip() or not host or "/" in host:
            raise ValueError(f"expected dc=host:port, got {item!r}")
        if dc.strip() in out:
            raise ValueError(f"dc {dc.strip()} is named twice")
        out[dc.strip()] = host
    if not out:
        raise ValueError("name at least one registry")
    return out


class BuilderSettings(CommonSettings):
    """Builder settings; ``DOCKVM_BUILDER_PORT`` sets its HTTP port (health, metrics)."""

    port: int = Field(default=9106, ge=1, le=65535, validation_alias="DOCKVM_BUILDER_PORT")
    dc: str = Field(
        default="dc1",
        pattern=r"^[a-z0-9][a-z0-9-]{0,31}$",
        description="the dc whose registry a passing image is pushed to",
    )
    registries: str = Field(
        default="dc1=http://127.0.0.1:5001,dc2=http://127.0.0.1:5002",
        description="dc=url of every registry (the image listing shows each dc's digest)",
    )
    docker_url: str = "unix:///var/run/docker.sock"
    builder_network: str = Field(
        default="dockvm-builder",
        pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$",
        description="the bridge network RUN steps use (made when missing)",
    )
    builder_concurrency: int = Field(default=1, ge=1, le=8, description="builds run at once")
    build_timeout_s: float = Field(default=900, gt=0, description="a build past this fails")
    build_attempts: int = Field(
        default=2, ge=1, le=10, description="runs of a build a builder killed midway gets"
    )
    verify_settle_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="the started image is watched until it used little CPU and opened no new "
        "socket for this long (at most 10x, 10 s at least)",
    )

    @field_validator("registries")
    @classmethod
    def _valid(cls, v: str) -> str:
        parse_registries(v)
        return v

    def registry_hosts(self) -> dict[str, str]:
        """``{dc: host:port}`` of every registry."""
        return parse_registries(self.registries)
