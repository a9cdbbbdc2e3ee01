"""The bastion's use-case layer: admin RPCs, access checks, and the live sessions."""

from .access import Access, Authorized
from .admin import Admin, RecordingSlice
from .live import LiveSession, LiveSessions

__all__ = ["Access", "Admin", "Authorized", "LiveSession", "LiveSessions", "RecordingSlice"]
