"""Settings of the gateway service (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pydantic import Field

from libs.common.settings import CommonSettings

__all__ = ["GatewaySettings"]


class GatewaySettings(CommonSettings):
    """gateway settings; ``DOCKVM_GATEWAY_PORT`` sets its HTTP port."""

    port: int = Field(default=8080, ge=1, le=65535, validation_alias="DOCKVM_GATEWAY_PORT")
