"""The provisioner's ports and adapters: the Docker runtime, the network and volume drivers
(their in-memory fakes are in ``services.provisioner.fakes``)."""

from .network import BridgeNetwork, MacvlanNetwork, NetworkDriver, OvsNetwork, make_network
from .runtime import ContainerInfo, ContainerRuntime, DockerRuntime
from .volumes import LvmVolumes, VolumeDriver, XfsLoopVolumes, make_volumes

__all__ = [
    "BridgeNetwork",
    "ContainerInfo",
    "ContainerRuntime",
    "DockerRuntime",
    "LvmVolumes",
    "MacvlanNetwork",
    "NetworkDriver",
    "OvsNetwork",
    "VolumeDriver",
    "XfsLoopVolumes",
    "make_network",
    "make_volumes",
]
