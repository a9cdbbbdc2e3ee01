"""imagesync's adapters: the Registry HTTP API V2 client (its fakes are in ``..fakes``)."""

from .registry import DigestMismatch, HttpRegistry, RegistryUnauthorized, new_session

__all__ = [
    "DigestMismatch",
    "HttpRegistry",
    "RegistryUnauthorized",
    "new_session",
]
