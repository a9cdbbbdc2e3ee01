"""imagesync's adapters: the Registry HTTP API V2 client and in-memory twins for unit tests."""

from .memory import MemoryBlobIndex, MemoryRegistry
from .registry import DigestMismatch, HttpRegistry, RegistryUnauthorized, new_session

__all__ = [
    "DigestMismatch",
    "HttpRegistry",
    "MemoryBlobIndex",
    "MemoryRegistry",
    "RegistryUnauthorized",
    "new_session",
]
