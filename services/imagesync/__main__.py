"""``python -m services.imagesync``: parse arguments, read settings, run."""

from libs.common.runner import main

from .app import lifespan
from .settings import ImagesyncSettings

if __name__ == "__main__":
    main("imagesync", ImagesyncSettings, lifespan)
