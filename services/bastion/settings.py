"""Settings of the bastion (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from libs.common.settings import CommonSettings

__all__ = ["BastionSettings"]


class BastionSettings(CommonSettings):
    """Bastion settings; ``DOCKVM_BASTION_PORT`` sets its HTTP port (health, metrics)."""

    port: int = Field(default=9105, ge=1, le=65535, validation_alias="DOCKVM_BASTION_PORT")
    bastion_ssh_host: str = Field(
        default="127.0.0.1", description="address the SSH server listens on"
    )
    bastion_ssh_port: int = Field(default=2222, ge=0, le=65535, description="its SSH port")
    bastion_cert_ttl_s: int = Field(
        default=300, ge=30, le=3600, description="life of a certificate signed for one session"
    )
    bastion_idle_timeout_s: float = Field(
        default=1800, gt=0, description="a session with no input or output this long ends"
    )
    bastion_max_session_s: float = Field(
        default=8 * 3600, gt=0, description="no session lasts longer than this"
    )
    bastion_watch_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=4,
        description="how often live sessions are checked against grants, users and timeouts",
    )
    bastion_connect_timeout_s: float = Field(
        default=10.0, gt=0, description="time to reach a machine's sshd"
    )
    bastion_login_timeout_s: float = Field(
        default=60.0, gt=0, description="time a client has to authenticate"
    )

    bastion_session_retention_s: float = Field(
        default=90 * 86400,
        gt=0,
        description="ended sessions (records and casts) older than this are removed",
    )
    bastion_prune_interval_s: float = Field(
        default=3600, gt=0, description="how often sessions past the retention are removed"
    )
    bastion_prune_batch: int = Field(
        default=1000, ge=1, le=100_000, description="most sessions removed in one round"
    )

    def bastion_dir(self) -> Path:
        """Where the bastion keeps its keys and recordings."""
        return self.state_dir / "bastion"
