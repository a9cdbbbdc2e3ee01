"""Settings of the ipam service (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pydantic import Field

from libs.common.settings import CommonSettings

__all__ = ["IpamSettings"]


class IpamSettings(CommonSettings):
    """ipam settings; ``DOCKVM_IPAM_PORT`` sets its HTTP port."""

    port: int = Field(default=9102, ge=1, le=65535, validation_alias="DOCKVM_IPAM_PORT")
    ipam_block_size: int = Field(
        default=128,
        ge=1,
        le=4096,
        description="never-used addresses a replica claims at once, at most a 16th of the "
        "pool (DOCKVM_IPAM_BLOCK_SIZE)",
    )
    ipam_pool_cache_s: float = Field(
        default=1.0,
        ge=0,
        description="how long a replica trusts its copy of a pool (DOCKVM_IPAM_POOL_CACHE_S)",
    )
