"""Settings of the imagesync service (environment prefix ``DOCKVM_``)."""

from __future__ import annotations

from pydantic import Field

from libs.common.settings import CommonSettings

__all__ = ["ImagesyncSettings"]


class ImagesyncSettings(CommonSettings):
    """imagesync settings; ``DOCKVM_IMAGESYNC_PORT`` sets its HTTP port."""

    port: int = Field(default=8081, ge=1, le=65535, validation_alias="DOCKVM_IMAGESYNC_PORT")
