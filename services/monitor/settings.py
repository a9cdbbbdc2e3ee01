"""Settings of the monitor service (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pydantic import Field

from libs.common.settings import HostAgentSettings

__all__ = ["MonitorSettings"]


class MonitorSettings(HostAgentSettings):
    """monitor settings; ``DOCKVM_MONITOR_PORT`` sets its HTTP port."""

    port: int = Field(default=9104, ge=1, le=65535, validation_alias="DOCKVM_MONITOR_PORT")
