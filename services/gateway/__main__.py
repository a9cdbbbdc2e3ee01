"""``python -m services.gateway``: parse arguments, read settings, run."""

from libs.common.runner import main

from .app import lifespan
from .settings import GatewaySettings

if __name__ == "__main__":
    main("gateway", GatewaySettings, lifespan)
