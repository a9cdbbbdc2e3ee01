"""The gateway's use-case layer: machine sagas (create, lifecycle, hosts) and rolling releases.

:class:`SagaDriver` runs every machine operation from the step table (:mod:`.steps`); its parts
hold each operation's logic. :class:`Releases` turns a release request into deploys.
"""

from ..store import ReleaseStore
from .driver import Clock, SagaDriver
from .hosts import host_views
from .releases import ArtifactCheck, MachineDirectory, Releases, StoreDirectory
from .steps import Op, Step, StepSpec

__all__ = [
    "ArtifactCheck",
    "Clock",
    "MachineDirectory",
    "Op",
    # Re-exported for the API package, which takes the release store with the use case.
    "ReleaseStore",
    "Releases",
    "SagaDriver",
    "Step",
    "StepSpec",
    "StoreDirectory",
    "host_views",
]
