"""``python -m services.bastion``: parse arguments, read settings, run."""

from libs.common.runner import main

from .app import lifespan
from .settings import BastionSettings

if __name__ == "__main__":
    main("bastion", BastionSettings, lifespan)
