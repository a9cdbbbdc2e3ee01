"""Network drivers: how a machine gets its static IP on its VLAN.

- ``bridge``: one Docker bridge network (an isolated Linux bridge) per VLAN id;
- ``macvlan``: one Docker macvlan network per VLAN on the 802.1q sub-interface
  ``<trunk>.<vlan>``;
- ``ovs``: the container runs with no Docker network; the agent adds a veth to an Open vSwitch
  bridge as an access port tagged with the VLAN, and re-plumbs it after every start because
  Docker gives the container a fresh network namespace each time.
"""

from __future__ import annotations

import asyncio
import sys
from collections import defaultdict
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Protocol

import structlog

from libs.common.errors import ConflictError, DomainError, ValidationFailed

from ..domain import LABEL_GATEWAY, LABEL_IP, LABEL_PREFIX, LABEL_VLAN, mac_address, port_name
from .host import DEFAULT_TIMEOUT_S, HostCommandFailed, HostCommands
from .runtime import ContainerInfo, ContainerRuntime, NetworkInfo

__all__ = ["BridgeNetwork", "MacvlanNetwork", "NetworkDriver", "OvsNetwork", "make_network"]

log = structlog.get_logger("provisioner.network")


class NetworkDriver(Protocol):
    """Port: attach machines to their VLAN."""

    kind: str
    static_ip: bool

    async def prepare(
        self, vlan_id: int, subnet: IPv4Network, gateway: IPv4Address
    ) -> tuple[str, bool]:
        """Make sure the VLAN's network exists; return the Docker network mode, and whether
        this call created the network."""
        ...

    async def plumb(self, info: ContainerInfo) -> None:
        """After a start: give the running container its address (no-op for Docker networks)."""
        ...

    async def release(self, machine_id: str, vlan_id: int, *, drop_network: bool = True) -> None:
        """After a removal: drop what the machine held, and (``drop_network``) the VLAN's
        network if no container uses it any more."""
        ...


class _DockerNetwork:
    """One Docker network per VLAN; Docker assigns the static IP."""

    kind = "docker"
    static_ip = True
    driver = "bridge"

    def __init__(self, runtime: ContainerRuntime, prefix: str) -> None:
        self._runtime = runtime
        self._prefix = prefix
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def name(self, vlan_id: int) -> str:
        """The Docker network of ``vlan_id``."""
        return f"{self._prefix}-vlan{vlan_id}"

    def options(self, vlan_id: int) -> dict[str, str]:
        """Driver options of the VLAN's network."""
        return {}

    async def prepare(
        self, vlan_id: int, subnet: IPv4Network, gateway: IPv4Address
    ) -> tuple[str, bool]:
        """Create the VLAN's network, or check that the existing one has the same pool."""
        name = self.name(vlan_id)
        created = False
        async with self._locks[name]:
            net = await self._runtime.network(name)
            if net is None:
                created = True
                try:
                    net = await self._runtime.create_network(
                        name, self.driver, str(subnet), str(gateway), self.options(vlan_id)
                    )
                except ConflictError:
                    created = False
                    net = await self._runtime.network(name)
                except DomainError as err:
                    # Docker refuses e.g. a pool that overlaps another network's, as it does
                    # when another agent on the same engine made this very network meanwhile:
                    # that one is used (its pool is checked below).
                    created = False
                    net = await self._made_meanwhile(name)
                    if net is None:
                        raise ValidationFailed(
                            f"cannot create network {name} for {subnet}: {err}",
                            reason="network_unavailable",
                        ) from err
            if net is None:
                raise ValidationFailed(f"network {name} vanished", reason="network_unavailable")
            if net.subnet != str(subnet) or (net.gateway and net.gateway != str(gateway)):
                raise ValidationFailed(
                    f"network {name} has pool {net.subnet} gateway {net.gateway}, "
                    f"not {subnet} gateway {gateway}",
                    reason="network_mismatch",
                )
        return name, created

    async def _made_meanwhile(self, name: str) -> NetworkInfo | None:
        """The network another agent on this engine is making at the same moment (Docker
        holds its pool before the network is listed), or None after about 2 s."""
        for _ in range(10):
            net = await self._runtime.network(name)
            if net is not None:
                return net
            await asyncio.sleep(0.2)
        return None

    async def plumb(self, info: ContainerInfo) -> None:
        """Docker plumbs its own networks."""

    async def release(self, machine_id: str, vlan_id: int, *, drop_network: bool = True) -> None:
        """Remove the VLAN's network once no container uses it."""
        if not drop_network:
            return
        name = self.name(vlan_id)
        async with self._locks[name]:
            if await self._runtime.remove_network(name):
                log.info("network removed", network=name)


class BridgeNetwork(_DockerNetwork):
    """``bridge``: an isolated Linux bridge per VLAN, as a Docker bridge network."""

    kind = "bridge"
    driver = "bridge"


class MacvlanNetwork(_DockerNetwork):
    """``macvlan``: a Docker macvlan network on ``<trunk>.<vlan>`` per VLAN."""

    kind = "macvlan"
    driver = "macvlan"
    sys_class_net = Path("/sys/class/net")

    def __init__(self, runtime: ContainerRuntime, prefix: str, trunk: str) -> None:
        super().__init__(runtime, prefix)
        self.trunk = trunk

    def options(self, vlan_id: int) -> dict[str, str]:
        """The 802.1q sub-interface is the parent (Docker creates it if missing)."""
        return {"parent": f"{self.trunk}.{vlan_id}"}

    async def prepare(
        self, vlan_id: int, subnet: IPv4Network, gateway: IPv4Address
    ) -> tuple[str, bool]:
        """Check the trunk exists (Docker says so only with a 500), then as for bridges."""
        if not (self.sys_class_net / self.trunk).exists():
            raise ValidationFailed(
                f"trunk interface {self.trunk} for VLAN {vlan_id} is missing on this host",
                reason="network_unavailable",
            )
        return await super().prepare(vlan_id, subnet, gateway)


# Run inside the container's network namespace: the userspace datapath forwards the veth's
# partial checksums as they are, so TCP only works with TX checksum offload off.
_TX_CSUM_OFF = """
import array, fcntl, socket, struct
ev = array.array('I', [0x17, 0])  # ETHTOOL_STXCSUM, off
ifr = struct.pack('16sP', b'eth0', ev.buffer_info()[0])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    fcntl.ioctl(s.fileno(), 0x8946, ifr)  # SIOCETHTOOL
"""


class OvsNetwork:
    """``ovs``: a veth per machine, an access port tagged with its VLAN on one OVS bridge."""

    kind = "ovs"
    static_ip = False

    def __init__(
        self,
        bridge: str,
        datapath: str = "netdev",
        command_timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        uplink: str = "",
        router: str = "",
    ) -> None:
        self.bridge = bridge
        self.datapath = datapath
        self.host = HostCommands(command_timeout_s)
        # On the local datacenter's fabric (scripts/hosts.sh): the host's bonded trunk, and the
        # bridge on which each VLAN's gateway port stands for the datacenter's router.
        self.uplink = uplink
        self.router = router
        self._carried: set[int] = set()
        self._lock = asyncio.Lock()
        self._ready = False

    async def _ensure_bridge(self) -> None:
        async with self._lock:
            if self._ready:
                return
            await self.host.run(*self.host.ovs_vsctl(
                "--may-exist", "add-br", self.bridge,
                "--", "set", "bridge", self.bridge, f"datapath_type={self.datapath}",
            ))  # fmt: skip
            await self.host.run("ip", "link", "set", self.bridge, "up", check=False)
            self._ready = True

    async def prepare(
        self, vlan_id: int, subnet: IPv4Network, gateway: IPv4Address
    ) -> tuple[str, bool]:
        """Make sure the OVS bridge exists; the container itself gets no Docker network."""
        try:
            await self._ensure_bridge()
            await self._carry(vlan_id, subnet, gateway)
        except HostCommandFailed as err:
            raise ValidationFailed(
                f"OVS bridge {self.bridge} unavailable: {err}", reason="network_unavailable"
            ) from err
        # The bridge is shared by every VLAN: it is never this machine's to remove.
        return "none", False

    async def _carry(self, vlan_id: int, subnet: IPv4Network, gateway: IPv4Address) -> None:
        """On the fabric: the VLAN on this host's trunk, its gateway port on the router."""
        if not self.uplink or vlan_id in self._carried:
            return
        # "add" puts the VLAN in the trunk's set once, whoever else added it.
        await self.host.run(
            *self.host.ovs_vsctl("add", "port", self.uplink, "trunks", str(vlan_id))
        )
        if self.router:
            dev = f"dvhgw{vlan_id}"
            await self.host.run(*self.host.ovs_vsctl(
                "--may-exist", "add-port", self.router, dev, f"tag={vlan_id}",
                "--", "set", "interface", dev, "type=internal",
            ))  # fmt: skip
            await self.host.run(
                "ip", "addr", "replace", f"{gateway}/{subnet.prefixlen}", "dev", dev
            )
            await self.host.run("ip", "link", "set", dev, "up")
        self._carried.add(vlan_id)

    async def plumb(self, info: ContainerInfo) -> None:
        """Give the running container eth0 on the bridge (idempotent for the same netns)."""
        if not info.running or not info.pid:
            return
        labels = info.labels
        ip, prefix = labels[LABEL_IP], labels[LABEL_PREFIX]
        vlan, gateway = labels[LABEL_VLAN], labels[LABEL_GATEWAY]
        ns = ("nsenter", "-t", str(info.pid), "-n")
        have = await self.host.run(
            *ns, "ip", "-o", "-4", "addr", "show", "dev", "eth0", check=False
        )
        if f" {ip}/{prefix} " in have:
            return
        await self._ensure_bridge()
        port = port_name(info.machine_id)
        peer = f"{port}c"
        await self.host.run(*self.host.ovs_vsctl("--if-exists", "del-port", self.bridge, port))
        await self.host.run("ip", "link", "del", port, check=False)
        await self.host.run("ip", "link", "add", port, "type", "veth", "peer", "name", peer)
        await self.host.run("ip", "link", "set", peer, "netns", str(info.pid))
        # The same MAC on every start: a new one would leave stale entries in the
        # neighbours' ARP caches for up to a minute.
        await self.host.run(*ns, "ip", "link", "set", peer, "name", "eth0", "address",
                            mac_address(info.machine_id))  # fmt: skip
        await self.host.run(*ns, "ip", "addr", "add", f"{ip}/{prefix}", "dev", "eth0")
        await self.host.run(*ns, "ip", "link", "set", "eth0", "up")
        await self.host.run(*ns, "ip", "route", "replace", "default", "via", gateway)
        await self.host.run(*ns, sys.executable, "-c", _TX_CSUM_OFF)
        await self.host.run("ip", "link", "set", port, "up")
        await self.host.run(*self.host.ovs_vsctl(
            "--may-exist", "add-port", self.bridge, port, f"tag={vlan}",
            "--", "set", "interface", port, f"external_ids:dockvm-machine={info.machine_id}",
        ))  # fmt: skip
        log.info("ovs port plumbed", machine_id=info.machine_id, port=port, vlan=vlan, ip=ip)

    async def release(self, machine_id: str, vlan_id: int, *, drop_network: bool = True) -> None:
        """Delete the machine's port and veth (the shared bridge stays)."""
        port = port_name(machine_id)
        await self.host.run(
            *self.host.ovs_vsctl("--if-exists", "del-port", self.bridge, port), check=False
        )
        await self.host.run("ip", "link", "del", port, check=False)


def make_network(
    kind: str,
    runtime: ContainerRuntime,
    *,
    prefix: str,
    trunk: str,
    ovs_bridge: str,
    command_timeout_s: float = DEFAULT_TIMEOUT_S,
    ovs_uplink: str = "",
    ovs_router: str = "",
) -> NetworkDriver:
    """The network driver named by the ``network_driver`` setting."""
    if kind == "bridge":
        return BridgeNetwork(runtime, prefix)
    if kind == "macvlan":
        return MacvlanNetwork(runtime, prefix, trunk)
    if kind == "ovs":
        return OvsNetwork(
            ovs_bridge, command_timeout_s=command_timeout_s, uplink=ovs_uplink, router=ovs_router
        )
    raise ValueError(f"unknown network driver {kind!r}")
