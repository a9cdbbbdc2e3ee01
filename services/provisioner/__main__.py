"""``python -m services.provisioner``: parse arguments, read settings, run."""

from libs.common.runner import main

from .app import lifespan
from .settings import ProvisionerSettings

if __name__ == "__main__":
    main("provisioner", ProvisionerSettings, lifespan)
