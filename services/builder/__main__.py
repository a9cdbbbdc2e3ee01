"""``python -m services.builder``: parse arguments, read settings, run."""

from libs.common.runner import main

from .app import lifespan
from .settings import BuilderSettings

if __name__ == "__main__":
    main("builder", BuilderSettings, lifespan)
