"""The gateway's web console at ``/ui/``: server-rendered pages over the ``/v1`` API."""

from .app import mount_console

__all__ = ["mount_console"]
