"""Settings of the gateway service (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from libs.common.settings import CommonSettings

from .domain.prewarm import POLICY_RE

__all__ = ["GatewaySettings"]


class GatewaySettings(CommonSettings):
    """gateway settings; ``DOCKVM_GATEWAY_PORT`` sets its HTTP port."""

    port: int = Field(default=8080, ge=1, le=65535, validation_alias="DOCKVM_GATEWAY_PORT")
    # Overcommit ratios applied to a host's capacity; a host may override them with the
    # heartbeat labels dockvm.overcommit.cpu|memory|disk.
    overcommit_cpu: float = Field(default=4.0, gt=0, le=64)
    overcommit_memory: float = Field(default=1.0, gt=0, le=8)
    overcommit_disk: float = Field(default=1.0, gt=0, le=8)
    # Which images the hosts of a dc pull when one arrives in its registry, or on a host's
    # return: all, in-use (the tags machines use) or a comma list of repo[:tag].
    prewarm_policy: str = Field(default="in-use", pattern=POLICY_RE)
    # A machine's image must come from the platform's builder (or be a base the image policy
    # lists), else 409 image_not_built. `make run` turns it on (scripts/services.sh).
    require_built_images: bool = False
    host_stale_s: float = Field(default=30.0, gt=0)
    host_down_s: float = Field(default=60.0, gt=0)
    host_check_s: float = Field(default=5.0, gt=0)
    known_announce_s: float = Field(default=60.0, gt=0)
    # A saga step with no answer after its timeout is re-sent, up to step_attempts times.
    ip_step_timeout_s: float = Field(default=10.0, gt=0)
    container_step_timeout_s: float = Field(default=120.0, gt=0)
    action_step_timeout_s: float = Field(default=60.0, gt=0)
    step_attempts: int = Field(default=3, ge=1, le=20)
    saga_tick_s: float = Field(default=1.0, gt=0)
    # The machine list is served from memory; other replicas' changes show within this.
    list_refresh_s: float = Field(default=2.0, gt=0)
    # A machine keeps its first transition and this many of its latest (a failed create's
    # whole path, under 10, is always kept).
    transitions_kept: int = Field(default=50, ge=10, le=10_000)
    rpc_timeout_s: float = Field(default=10.0, gt=0)
    # Releases: how long a machine may take to answer a deploy, and how often to sweep.
    deploy_timeout_s: float = Field(default=600.0, gt=0)
    release_sweep_s: float = Field(default=15.0, gt=0)
    maven_url: str = "http://127.0.0.1:8090"
    wait_max_s: float = Field(default=900.0, gt=0)
    resize_wait_s: float = Field(default=30.0, ge=0)
    idempotency_retention_s: float = Field(default=86400.0, gt=0)
    audit_retention_days: float = Field(default=90.0, gt=0)
    prune_every_s: float = Field(default=3600.0, gt=0)
    # The web console at /ui/ (services/gateway/console): pages over this gateway's /v1 API.
    console: bool = True
    admin_token_file: Path | None = Field(
        default=None, description="default: $DOCKVM_STATE_DIR/admin.token"
    )

    # Monitoring on Prometheus (services/gateway/api/prometheus.py): where history is read,
    # the credential of discovery and alerts, and the addresses discovery hands out.
    prometheus_url: str = "http://127.0.0.1:9090"
    prometheus_secret_file: Path | None = Field(
        default=None, description="default: $DOCKVM_STATE_DIR/prometheus/gateway.secret"
    )
    prometheus_services: str = (
        "gateway=127.0.0.1:8080,imagesync=127.0.0.1:8081,ipam=127.0.0.1:9102,"
        "bastion=127.0.0.1:9105,builder=127.0.0.1:9106"
    )
    prometheus_agent_ports: str = "provisioner=9103,monitor=9104"
    node_exporter_port: int = Field(default=9100, ge=1, le=65535)

    def prometheus_secret_path(self) -> Path:
        """The bearer Prometheus and Alertmanager present (written by scripts/stack.sh)."""
        return self.prometheus_secret_file or self.state_dir / "prometheus" / "gateway.secret"

    def token_path(self) -> Path:
        """Where the bootstrap admin token is written."""
        return self.admin_token_file or self.state_dir / "admin.token"
