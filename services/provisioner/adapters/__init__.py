"""The provisioner's ports and adapters: the Docker runtime, the network and volume drivers."""

from .network import BridgeNetwork, MacvlanNetwork, NetworkDriver, OvsNetwork, make_network
from .runtime import ContainerInfo, ContainerRuntime, DockerRuntime, MemoryRuntime
from .volumes import LvmVolumes, MemoryVolumes, VolumeDriver, XfsLoopVolumes, make_volumes

__all__ = [
    "BridgeNetwork",
    "ContainerInfo",
    "ContainerRuntime",
    "DockerRuntime",
    "LvmVolumes",
    "MacvlanNetwork",
    "MemoryRuntime",
    "MemoryVolumes",
    "NetworkDriver",
    "OvsNetwork",
    "VolumeDriver",
    "XfsLoopVolumes",
    "make_network",
    "make_volumes",
]
