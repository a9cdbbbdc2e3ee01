"""The bastion's use-case layer: admin RPCs, access checks, the live sessions, retention."""

from .access import Access, Authorized
from .admin import Admin, RecordingSlice
from .live import LiveSession, LiveSessions
from .retention import SessionPruner

__all__ = [
    "Access",
    "Admin",
    "Authorized",
    "LiveSession",
    "LiveSessions",
    "RecordingSlice",
    "SessionPruner",
]
