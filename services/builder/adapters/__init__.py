"""The builder's adapters: the Docker Engine and the registries' manifests."""

from .engine import DockerEngine
from .registry import HttpRegistries

__all__ = ["DockerEngine", "HttpRegistries"]
