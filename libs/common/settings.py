"""Settings for every service, read once from the environment (prefix ``DOCKVM_``).

Nothing else in dockvm reads the environment: ``__main__`` calls :func:`load_settings`
and passes the result down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["CommonSettings", "HostAgentSettings", "SettingsError", "load_settings"]

ENV_PREFIX = "DOCKVM_"


class CommonSettings(BaseSettings):
    """What every service needs: where the bus, the database and the state live."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True
    )

    # Where the service keeps its files (keys, tokens, disks, logs); made 0700.
    state_dir: Path = Path("/var/lib/dockvm")
    # RabbitMQ; a vhost in the path keeps a deployment apart from others on one broker.
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # The MongoDB API (FerretDB v1 in the local stack).
    mongo_url: str = "mongodb://127.0.0.1:27017/"
    # The database every service of one deployment shares.
    mongo_db: str = "dockvm"
    # The address the service's HTTP port (health, readiness, metrics, API) listens on.
    bind_host: str = "127.0.0.1"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool | None = Field(
        default=None, description="JSON logs; default: JSON when stdout is not a terminal"
    )
    # Unacknowledged messages a consumer holds at once (its parallelism).
    prefetch: int = Field(default=32, ge=1, le=1000)
    # Deliveries of one message before it goes to the dead-letter queue.
    delivery_limit: int = Field(default=5, ge=1, le=100)
    # At SIGTERM: how long handlers in flight may run before the process exits.
    shutdown_grace_s: float = Field(default=20.0, gt=0)

    # Each service overrides this with its own field and env name (DOCKVM_<SERVICE>_PORT).
    port: int = Field(default=0, ge=0, le=65535)


class HostAgentSettings(CommonSettings):
    """Settings of the agents that run once per Docker host (provisioner, monitor)."""

    # This host's name on the bus and in the API (commands to it are routed by it).
    host_id: str = Field(default="local1", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    # The datacenter the host belongs to.
    dc: str = Field(default="dc1", pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    # The Docker Engine this agent drives.
    docker_url: str = "unix:///var/run/docker.sock"
    # Threads for the Docker SDK's blocking calls.
    docker_workers: int = Field(default=8, ge=1, le=64)


class SettingsError(SystemExit):
    """Raised when the environment holds an invalid setting; the message names the variable."""


S = TypeVar("S", bound=CommonSettings)


def _env_name(cls: type[BaseSettings], field: str) -> str:
    if field.upper().startswith(ENV_PREFIX):
        return field.upper()
    info = cls.model_fields.get(field)
    alias = info.validation_alias if info else None
    if isinstance(alias, str):
        return alias.upper()
    return f"{ENV_PREFIX}{field.upper()}"


def load_settings(cls: type[S], **overrides: object) -> S:
    """Build ``cls`` from the environment plus ``overrides``; exit naming each bad variable."""
    try:
        return cls(**overrides)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = str(e["loc"][0]) if e["loc"] else "?"
            lines.append(f"invalid setting {_env_name(cls, field)}: {e['msg']}")
        raise SettingsError("\n".join(lines)) from err
