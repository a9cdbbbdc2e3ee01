"""Settings of the provisioner service (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pydantic import Field

from libs.common.settings import HostAgentSettings

__all__ = ["ProvisionerSettings"]


class ProvisionerSettings(HostAgentSettings):
    """provisioner settings; ``DOCKVM_PROVISIONER_PORT`` sets its HTTP port."""

    port: int = Field(default=9103, ge=1, le=65535, validation_alias="DOCKVM_PROVISIONER_PORT")
