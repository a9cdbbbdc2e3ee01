"""Settings of the monitor service (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from libs.common.settings import HostAgentSettings

__all__ = ["MonitorSettings"]


class MonitorSettings(HostAgentSettings):
    """monitor settings; ``DOCKVM_MONITOR_PORT`` sets its HTTP port."""

    port: int = Field(default=9104, ge=1, le=65535, validation_alias="DOCKVM_MONITOR_PORT")
    monitor_interval_s: float = Field(default=10.0, gt=0, le=3600)
    # How long published lifecycle records are kept (their dedupe window); samples are
    # Prometheus's (DOCKVM_PROM_RETENTION).
    monitor_retention_days: float = Field(default=8.0, gt=0)
    monitor_retention_every_s: float = Field(default=3600.0, gt=0)
    monitor_resync_every_s: float = Field(default=60.0, gt=0)
    monitor_flap_window_s: int = Field(default=300, ge=1)
    monitor_flap_threshold: int = Field(default=3, ge=2)
    monitor_cgroup_root: Path = Path("/sys/fs/cgroup")
    monitor_proc_root: Path = Path("/proc")
    monitor_label: str | None = Field(
        default=None,
        description="an extra Docker label selector (k=v) narrowing which dockvm containers "
        "this monitor follows; used to isolate tests",
    )
    monitor_replay_max_s: float = Field(
        default=3600.0, gt=0, description="how far back events are replayed at start"
    )
