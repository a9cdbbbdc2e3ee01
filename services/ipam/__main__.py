"""``python -m services.ipam``: parse arguments, read settings, run."""

from libs.common.runner import main

from .app import lifespan
from .settings import IpamSettings

if __name__ == "__main__":
    main("ipam", IpamSettings, lifespan)
