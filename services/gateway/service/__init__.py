"""The gateway's use-case layer: machine sagas, host tracking and release rollouts."""

from ..releases import (
    RELEASE_BINDINGS,
    RELEASE_QUEUE,
    Releases,
    ReleaseStore,
    StoreDirectory,
    release_handlers,
)
from ..sagas import SagaDriver, StepSpec, host_views

__all__ = [
    "RELEASE_BINDINGS",
    "RELEASE_QUEUE",
    "ReleaseStore",
    "Releases",
    "SagaDriver",
    "StepSpec",
    "StoreDirectory",
    "host_views",
    "release_handlers",
]
