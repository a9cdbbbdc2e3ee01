"""``python -m services.monitor``: parse arguments, read settings, run."""

from libs.common.runner import main

from .app import lifespan
from .settings import MonitorSettings

if __name__ == "__main__":
    main("monitor", MonitorSettings, lifespan)
