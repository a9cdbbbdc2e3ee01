"""The monitor's adapters: cgroup files, network namespaces, the Docker API and events."""

from .cgroups import (
    CgroupReader,
    CgroupUnavailable,
    CgroupV1Reader,
    CgroupV2Reader,
    CgroupVersion,
    detect_version,
    make_reader,
)
from .docker_events import Connected, Disconnected, DockerEngine, DockerEvents, parse_docker_time
from .host import host_cpus, host_memory, raise_fd_limit
from .netns import NetnsReader, NetnsUnavailable, parse_net_dev, read_net

__all__ = [
    "CgroupReader",
    "CgroupUnavailable",
    "CgroupV1Reader",
    "CgroupV2Reader",
    "CgroupVersion",
    "Connected",
    "Disconnected",
    "DockerEngine",
    "DockerEvents",
    "NetnsReader",
    "NetnsUnavailable",
    "detect_version",
    "host_cpus",
    "host_memory",
    "make_reader",
    "parse_docker_time",
    "parse_net_dev",
    "raise_fd_limit",
    "read_net",
]
