"""Settings of the ipam service (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pydantic import Field

from libs.common.settings import CommonSettings

__all__ = ["IpamSettings"]


class IpamSettings(CommonSettings):
    """ipam settings; ``DOCKVM_IPAM_PORT`` sets its HTTP port."""

    port: int = Field(default=9102, ge=1, le=65535, validation_alias="DOCKVM_IPAM_PORT")
