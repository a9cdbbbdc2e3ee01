"""Settings of the provisioner service (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from libs.common.contracts.bastion import CA_PUBLIC_KEY_FILE
from libs.common.settings import HostAgentSettings

from .adapters.bastion import parse_sources

__all__ = ["ProvisionerSettings"]


class ProvisionerSettings(HostAgentSettings):
    """provisioner settings; ``DOCKVM_PROVISIONER_PORT`` sets its HTTP port."""

    port: int = Field(default=9103, ge=1, le=65535, validation_alias="DOCKVM_PROVISIONER_PORT")

    # How machines get their VLAN and their data disk.
    network_driver: Literal["bridge", "macvlan", "ovs"] = "bridge"
    volume_driver: Literal["xfs", "lvm"] = "xfs"
    # Docker network names are "<network_prefix>-vlan<id>"; the OVS bridge is ovs_bridge.
    network_prefix: str = Field(default="dockvm", pattern=r"^[a-z0-9][a-z0-9-]{0,30}$")
    macvlan_trunk: str = "eth0"
    ovs_bridge: str = Field(default="dockvm-ovs", pattern=r"^[a-zA-Z0-9_-]{1,15}$")
    # The local datacenter (scripts/hosts.sh): a VLAN a machine needs is added to this bond's
    # trunk, and its gateway port (the pool's gateway address) to the router bridge. Empty: off.
    ovs_uplink: str = Field(default="", pattern=r"^[a-zA-Z0-9_-]{0,15}$")
    ovs_router: str = Field(default="", pattern=r"^[a-zA-Z0-9_-]{0,15}$")
    lvm_vg: str = "dockvm"
    # Where other hosts' agents fetch a machine this one exports for a migration (its HTTP
    # port); empty: http://<bind_host>:<port>.
    export_url: str = Field(default="", pattern=r"^(https?://[^\s/]+)?$")

    # Creates of different machines run in parallel, at most create_parallelism at once. Each
    # holds one Docker thread at a time, so docker_workers (the commands' pool, and the SDK's
    # connection pool) must be at least as wide; the periodic jobs have their own
    # upkeep_docker_workers threads, so listing every container never holds a create's thread.
    docker_workers: int = Field(default=24, ge=1, le=128)
    create_parallelism: int = Field(default=16, ge=1, le=128)
    upkeep_docker_workers: int = Field(default=2, ge=1, le=16)

    # Periodic jobs.
    heartbeat_interval_s: float = Field(default=10.0, gt=0)
    reconcile_interval_s: float = Field(default=60.0, gt=0)
    orphan_grace_s: float = Field(default=600.0, ge=0)
    # An orphan is quarantined (stopped, disk kept), deleted only on a purge or after this.
    orphan_retention_s: float = Field(default=7 * 86400.0, ge=0)
    # A sweep with more orphans due than this, or (more than one) than this fraction of the
    # host's machines, quarantines none and raises host.alert: likely a control-plane fault.
    orphan_sweep_cap: int = Field(default=5, ge=0)
    orphan_sweep_fraction: float = Field(default=0.5, gt=0, le=1)
    # A round of a periodic job (a heartbeat, a reconcile, one machine's re-plumb) that runs
    # longer is cut and logged, so one stuck round never stops the next ones.
    upkeep_timeout_s: float = Field(default=300.0, gt=0)

    # Every host command (losetup, mount, ovs-vsctl, ...) is killed, with what it forked, past
    # this: ovs-vsctl with ovsdb down, or losetup on a stuck loop device, never return.
    host_command_timeout_s: float = Field(default=60.0, gt=0)

    # What every machine gets.
    lxcfs_path: Path = Path("/var/lib/lxcfs")
    pids_limit: int = Field(default=4096, ge=64)
    min_memory: int = Field(default=64 << 20, ge=16 << 20)
    memory_margin: int = Field(default=64 << 20, ge=0, description="resize-down headroom")
    stop_timeout_s: int = Field(default=30, ge=0, le=600)

    # Releases: the Maven repository deploys download from (env DOCKVM_MAVEN_URL).
    maven_url: str = "http://127.0.0.1:8090"

    # Reported in the heartbeat, for placement.
    labels: dict[str, str] = Field(default_factory=dict)

    # The bastion's edge. Machines trust the user CA public key in bastion_ca_pubkey (default:
    # the bastion's own file under the state dir; absent: no certificate is trusted, a warning).
    # Their SSH port answers only bastion_source ("10.0.0.1,10.2.0.0/24"; empty: each machine's
    # network gateway, where a bastion on this host connects from), unless ssh_guard is off.
    bastion_ca_pubkey: Path | None = None
    bastion_source: str = ""
    ssh_guard: bool = True

    @field_validator("bastion_source")
    @classmethod
    def _sources(cls, value: str) -> str:
        """Refuse a source that is not an IPv4 address or network, naming it."""
        parse_sources(value)
        return value

    @property
    def ca_pubkey_path(self) -> Path:
        """The bastion user CA public key file the machines are given."""
        return self.bastion_ca_pubkey or self.state_dir / CA_PUBLIC_KEY_FILE

    @field_validator("create_parallelism")
    @classmethod
    def _within_docker_workers(cls, value: int, info: ValidationInfo) -> int:
        """Refuse a width the Docker pool would throttle, naming both settings."""
        workers = info.data.get("docker_workers")
        if workers is not None and value > workers:
            raise ValueError(
                f"{value} exceeds DOCKVM_DOCKER_WORKERS ({workers}); each create in flight "
                "holds a Docker thread, so raise DOCKVM_DOCKER_WORKERS to at least this"
            )
        return value
