"""Pure decisions of the host agent: names, labels, the container spec, guards and sums.

Nothing here does I/O: adapters feed facts in (host capacity, current limits, usage), and the
handlers act on what comes out.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network

from libs.common.contracts.bastion import MACHINE_CA_PATH
from libs.common.contracts.provisioner import (
    XFS_MIN_DISK_BYTES,
    ContainerCreate,
    ContainerResize,
)
from libs.common.errors import ValidationFailed
from libs.common.units import format_bytes

__all__ = [
    "CAPABILITIES",
    "CPU_PERIOD",
    "LABEL_APP",
    "LABEL_CLUSTER",
    "LABEL_DIRECT_SSH",
    "LABEL_GATEWAY",
    "LABEL_HOST",
    "LABEL_INIT",
    "LABEL_IP",
    "LABEL_MACHINE",
    "LABEL_PREFIX",
    "LABEL_VLAN",
    "LXCFS_FILES",
    "SYSTEMD_CAPABILITIES",
    "SYSTEMD_CGROUP",
    "ContainerSpec",
    "HostFacts",
    "Limits",
    "ListVerdict",
    "Mount",
    "OrphanTracker",
    "Ownership",
    "QuarantineRecord",
    "ResizePlan",
    "ResizeRefused",
    "SweepPlan",
    "admit_list",
    "allocation",
    "build_spec",
    "check_create",
    "check_machine_id",
    "container_name",
    "cpus_from_quota",
    "cpus_to_quota",
    "expired",
    "free_disk",
    "mac_address",
    "machine_environment",
    "machine_init",
    "ownership",
    "plan_resize",
    "plan_sweep",
    "port_name",
    "subnet_of",
    "systemd_cgroup",
]

LABEL_MACHINE = "dockvm.machine_id"
LABEL_APP = "dockvm.app"
LABEL_IP = "dockvm.ip"
LABEL_VLAN = "dockvm.vlan"
LABEL_PREFIX = "dockvm.prefix_len"
LABEL_GATEWAY = "dockvm.gateway"
# Which agent made the container, and for which control plane: an agent only ever treats
# containers of its own host (and cluster) as orphans, never another agent's on the same engine.
LABEL_HOST = "dockvm.host"
LABEL_CLUSTER = "dockvm.cluster"
# "false": the machine trusts the bastion's CA and its SSH answers only the bastion; "true": a
# break-glass machine (root's keys installed, SSH open to any source). Absent on a machine made
# before the bastion, which keeps its old keys and stays open (recreate it to bring it under).
LABEL_DIRECT_SSH = "dockvm.direct_ssh"
_RESERVED_LABEL = "dockvm."
# On an image: the init its machines run unless the create says otherwise ("systemd" or
# "tini"); on a machine's container: the init it was made with.
LABEL_INIT = "dockvm.init"

# What sshd (privilege separation, chroot, audit of logins) and the init need, nothing more.
CAPABILITIES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETUID",
    "SETGID",
    "KILL",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "AUDIT_WRITE",
)
# systemd also drops capabilities from its units' bounding sets (CapabilityBoundingSet=, which
# journald, logind and most Debian units set): without SETPCAP they fail at exec (218/CAPABILITIES).
# SETPCAP only lets a process drop capabilities or pass on ones it holds; nothing else is added.
# No SYS_ADMIN (units' mount namespaces are skipped as in any container), no SYS_BOOT (it would
# allow kexec_load of the host's kernel): a reboot inside exits PID 1 instead (see the image).
SYSTEMD_CAPABILITIES = (*CAPABILITIES, "SETPCAP")
# The cgroup v1 name=systemd hierarchy of the host, where systemd machines get a directory of
# their own bound rw over their /sys/fs/cgroup/systemd (Docker's own is read-only): systemd must
# create its init.scope and slices there. It holds no controller, so no limit can be changed
# through it; the memory and cpu hierarchies stay Docker's, read-only. Absent on cgroup v2 hosts.
SYSTEMD_CGROUP = "/sys/fs/cgroup/systemd"
# LXCFS files bound over the container's own, so free/top/uptime see the machine's limits.
LXCFS_FILES = (
    "proc/meminfo",
    "proc/cpuinfo",
    "proc/stat",
    "proc/uptime",
    "proc/diskstats",
    "proc/loadavg",
    "proc/swaps",
    "sys/devices/system/cpu/online",
)
CPU_PERIOD = 100_000
_MACHINE_ID_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,63}$")


def container_name(machine_id: str) -> str:
    """The Docker name of a machine's container; Docker's name uniqueness makes it one."""
    return f"dockvm-{machine_id}"


def port_name(machine_id: str) -> str:
    """A stable host-side interface name (<= 15 chars) for a machine's OVS port."""
    return "dv" + hashlib.sha1(machine_id.encode()).hexdigest()[:11]


def mac_address(machine_id: str) -> str:
    """A stable, locally administered MAC for the machine, so neighbours' ARP stays right."""
    digest = hashlib.sha1(f"mac:{machine_id}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def machine_environment(cpus: float) -> str:
    """The machine's /etc/environment: nproc (and OpenMP) honour OMP_NUM_THREADS, which CPU
    affinity cannot express for a CFS quota; pam_env puts it into every SSH session."""
    return f"OMP_NUM_THREADS={max(1, math.ceil(cpus))}\n"


def cpus_to_quota(cpus: float) -> int:
    """CFS quota (µs per :data:`CPU_PERIOD`) for ``cpus`` CPUs."""
    return max(1000, round(cpus * CPU_PERIOD))


def cpus_from_quota(quota: int | None, period: int | None) -> float:
    """CPUs from a CFS quota and period; 0 when unlimited."""
    if not quota or quota <= 0:
        return 0.0
    return round(quota / (period or CPU_PERIOD), 3)


def subnet_of(ip: IPv4Address, prefix_len: int) -> IPv4Network:
    """The network ``ip/prefix_len`` belongs to."""
    return IPv4Network(f"{ip}/{prefix_len}", strict=False)


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What the host can give one machine."""

    cpus: float
    memory: int
    disk_free: int
    min_memory: int = 64 << 20
    min_disk: int = XFS_MIN_DISK_BYTES  # the volume driver's smallest disk


@dataclass(frozen=True, slots=True)
class Limits:
    """The resources one machine was given."""

    cpus: float
    memory: int
    disk: int


def check_machine_id(machine_id: str) -> None:
    """Refuse a machine_id that could not name a container, or could escape a directory."""
    if not _MACHINE_ID_RE.match(machine_id):
        raise ValidationFailed(
            f"machine_id {machine_id!r} must be letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)",
            reason="invalid_machine_id",
        )


def check_create(cmd: ContainerCreate, host: HostFacts) -> None:
    """Refuse a create the host cannot serve, naming the field; ``reason`` is a stable code."""
    check_machine_id(cmd.machine_id)
    if cmd.cpus > host.cpus:
        raise ValidationFailed(
            f"cpus {cmd.cpus:g} exceeds the host's {host.cpus:g}", reason="cpus_exhausted"
        )
    if cmd.memory < host.min_memory:
        raise ValidationFailed(
            f"memory {format_bytes(cmd.memory)} is below the minimum "
            f"{format_bytes(host.min_memory)}",
            reason="memory_too_small",
        )
    if cmd.memory > host.memory:
        raise ValidationFailed(
            f"memory {format_bytes(cmd.memory)} exceeds the host's {format_bytes(host.memory)}",
            reason="memory_exhausted",
        )
    if cmd.disk < host.min_disk:
        # mkfs.xfs refuses filesystems smaller than 300 MiB.
        raise ValidationFailed(
            f"disk {format_bytes(cmd.disk)} is below the minimum {format_bytes(host.min_disk)}",
            reason="disk_too_small",
        )
    if cmd.disk > host.disk_free:
        raise ValidationFailed(
            f"disk {format_bytes(cmd.disk)} exceeds the host's free "
            f"{format_bytes(max(host.disk_free, 0))}",
            reason="disk_exhausted",
        )
    net = subnet_of(cmd.ip, cmd.prefix_len)
    if cmd.ip in (net.network_address, net.broadcast_address) and net.prefixlen < 31:
        raise ValidationFailed(f"ip {cmd.ip} is not a host address of {net}", reason="bad_ip")
    if cmd.gateway not in net:
        raise ValidationFailed(f"gateway {cmd.gateway} is outside {net}", reason="bad_gateway")
    if cmd.gateway == cmd.ip:
        raise ValidationFailed(f"ip {cmd.ip} is the gateway", reason="bad_ip")
    reserved = [k for k in cmd.labels if k.startswith(_RESERVED_LABEL)]
    if reserved:
        raise ValidationFailed(
            f"labels {reserved} use the reserved prefix 'dockvm.'", reason="bad_labels"
        )


def free_disk(fs_free: int, volumes: Iterable[tuple[int, int]]) -> int:
    """Free bytes once every sparse volume (apparent size, bytes used) is fully written."""
    promised = sum(max(apparent - used, 0) for apparent, used in volumes)
    return fs_free - promised


@dataclass(frozen=True, slots=True)
class Mount:
    """A bind mount into the container."""

    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True, slots=True)
class ContainerSpec:
    """Everything Docker needs to make one machine's container."""

    name: str
    image: str
    hostname: str
    labels: dict[str, str]
    env: dict[str, str]
    cpus: float
    memory: int
    pids_limit: int
    mounts: tuple[Mount, ...]
    network: str
    ip: str | None
    capabilities: tuple[str, ...] = CAPABILITIES
    restart_policy: str = "unless-stopped"
    stop_timeout_s: int = 30
    extra: dict[str, str] = field(default_factory=dict)
    # systemd machines only (see build_spec): tmpfs targets, the cgroup namespace mode, and
    # the signal docker stop sends.
    tmpfs: tuple[str, ...] = ()
    cgroupns: str | None = None
    stop_signal: str | None = None


def build_spec(
    cmd: ContainerCreate,
    *,
    data_path: str,
    network: str,
    static_ip: bool,
    lxcfs_root: str | None,
    lxcfs_present: Iterable[str] = LXCFS_FILES,
    environment_file: str | None = None,
    pids_limit: int = 4096,
    stop_timeout_s: int = 30,
    user_ca_file: str | None = None,
    host_id: str | None = None,
    cluster_id: str | None = None,
    init: str | None = None,
    systemd_cgroup: str | None = None,
) -> ContainerSpec:
    """The container of ``cmd``: limits, labels, sshd's trust (the bastion's user CA; root's
    keys only for ``direct_ssh``), /data, the LXCFS views, and what its init (``init``, else
    ``cmd.init``, else tini) needs; ``systemd_cgroup`` is the host's name=systemd directory
    of this machine (cgroup v1 hosts)."""
    labels = {
        **cmd.labels,
        LABEL_MACHINE: cmd.machine_id,
        LABEL_APP: cmd.app,
        LABEL_IP: str(cmd.ip),
        LABEL_VLAN: str(cmd.vlan_id),
        LABEL_PREFIX: str(cmd.prefix_len),
        LABEL_GATEWAY: str(cmd.gateway),
    }
    # Whose it is: the agent that made it, for its cluster (none before it heard one).
    if host_id is not None:
        labels[LABEL_HOST] = host_id
    if cluster_id is not None:
        labels[LABEL_CLUSTER] = cluster_id
    env = {"OMP_NUM_THREADS": str(max(1, math.ceil(cmd.cpus))), **cmd.env}
    labels[LABEL_DIRECT_SSH] = "true" if cmd.direct_ssh else "false"
    if cmd.direct_ssh:
        if cmd.ssh_authorized_keys:
            keys = "\n".join(k.strip() for k in cmd.ssh_authorized_keys)
            env["DOCKVM_AUTHORIZED_KEYS"] = keys
    mounts = [Mount(data_path, "/data")]
    if user_ca_file is not None:
        mounts.append(Mount(user_ca_file, MACHINE_CA_PATH, read_only=True))
    if environment_file is not None:
        mounts.append(Mount(environment_file, "/etc/environment", read_only=True))
    if lxcfs_root is not None:
        present = set(lxcfs_present)
        mounts += [
            Mount(f"{lxcfs_root}/{rel}", f"/{rel}", read_only=True)
            for rel in LXCFS_FILES
            if rel in present
        ]
    spec = ContainerSpec(
        name=container_name(cmd.machine_id),
        image=cmd.image,
        hostname=cmd.hostname,
        labels=labels,
        env=env,
        cpus=cmd.cpus,
        memory=cmd.memory,
        pids_limit=pids_limit,
        mounts=tuple(mounts),
        network=network,
        ip=str(cmd.ip) if static_ip else None,
        stop_timeout_s=stop_timeout_s,
    )
    if (init or cmd.init or "tini") == "systemd":
        return _as_systemd(spec, systemd_cgroup)
    return spec


def machine_init(requested: str | None, image_labels: dict[str, str]) -> str:
    """The init a machine runs: the create's, else its image's ``dockvm.init``, else tini."""
    if requested:
        return requested
    return "systemd" if image_labels.get(LABEL_INIT) == "systemd" else "tini"


def systemd_cgroup(machine_id: str) -> str:
    """The host directory of a systemd machine's name=systemd cgroups (under ``dockvm/``, apart
    from Docker's own ``docker/``)."""
    return f"{SYSTEMD_CGROUP}/dockvm/{container_name(machine_id)}"


def _as_systemd(spec: ContainerSpec, systemd_cgroup: str | None) -> ContainerSpec:
    """``spec`` with systemd as PID 1, unprivileged: the container interface systemd expects
    (``container=docker``, a tmpfs /run and /run/lock), a cgroup namespace of its own
    (its /proc/1/cgroup reads "/"), a writable name=systemd hierarchy of its own on cgroup v1,
    SETPCAP, SIGINT to shut down cleanly (the image maps it to exit.target, PID 1 exits 143),
    and a restart policy that brings back a reboot inside (exits 129) and a stop by an engine
    going down (143, not a manual stop), but not a poweroff or halt inside (exits 0)."""
    mounts = spec.mounts
    if systemd_cgroup is not None:
        mounts = (*mounts, Mount(systemd_cgroup, SYSTEMD_CGROUP))
    return replace(
        spec,
        labels={**spec.labels, LABEL_INIT: "systemd"},
        env={**spec.env, "container": "docker"},
        mounts=mounts,
        capabilities=SYSTEMD_CAPABILITIES,
        restart_policy="on-failure",
        tmpfs=("/run", "/run/lock"),
        cgroupns="private",
        stop_signal="SIGINT",
    )


class ResizeRefused(ValidationFailed):
    """A resize that would hurt the machine (shrink a disk, starve its memory)."""

    reason = "resize_refused"


@dataclass(frozen=True, slots=True)
class ResizePlan:
    """What to change: ``None`` leaves a resource as it is."""

    cpus: float | None
    memory: int | None
    disk: int | None

    @property
    def empty(self) -> bool:
        """Nothing to change."""
        return self.cpus is None and self.memory is None and self.disk is None


def plan_resize(
    cmd: ContainerResize,
    current: Limits,
    *,
    memory_used: int,
    margin: int,
    host: HostFacts,
) -> ResizePlan:
    """Decide a live resize, refusing a disk shrink and memory below usage (unless forced)."""
    cpus = cmd.cpus if cmd.cpus is not None and cmd.cpus != current.cpus else None
    memory = cmd.memory if cmd.memory is not None and cmd.memory != current.memory else None
    disk = cmd.disk if cmd.disk is not None and cmd.disk != current.disk else None
    if cpus is not None and cpus > host.cpus:
        raise ResizeRefused(
            f"cpus {cpus:g} exceeds the host's {host.cpus:g}", reason="cpus_exhausted"
        )
    if memory is not None:
        if memory > host.memory:
            raise ResizeRefused(
                f"memory {format_bytes(memory)} exceeds the host's {format_bytes(host.memory)}",
                reason="memory_exhausted",
            )
        if memory < host.min_memory:
            raise ResizeRefused(
                f"memory {format_bytes(memory)} is below the minimum "
                f"{format_bytes(host.min_memory)}",
                reason="memory_too_small",
            )
        if memory < current.memory and memory < memory_used + margin and not cmd.force:
            raise ResizeRefused(
                f"memory {format_bytes(memory)} is below current usage "
                f"{format_bytes(memory_used)} plus margin {format_bytes(margin)}; "
                "use force to do it anyway",
                reason="memory_below_usage",
            )
    if disk is not None:
        if disk < current.disk:
            raise ResizeRefused(
                f"disk {format_bytes(disk)} is smaller than the current "
                f"{format_bytes(current.disk)}: XFS cannot shrink",
                reason="disk_shrink_refused",
            )
        if disk - current.disk > host.disk_free:
            raise ResizeRefused(
                f"growing the disk by {format_bytes(disk - current.disk)} exceeds the host's "
                f"free {format_bytes(max(host.disk_free, 0))}",
                reason="disk_exhausted",
            )
    return ResizePlan(cpus=cpus, memory=memory, disk=disk)


def allocation(machines: Iterable[Limits]) -> Limits:
    """What the host's machines were given, summed."""
    cpus = memory = disk = 0
    for m in machines:
        cpus += m.cpus
        memory += m.memory
        disk += m.disk
    return Limits(cpus=round(cpus, 3), memory=memory, disk=disk)


class OrphanTracker:
    """Decides which machines of this host are orphans, and which have been orphans long enough.

    A machine is an orphan while it is absent from the latest ``machines.known`` list of this
    agent's cluster. It is due for quarantine once it was first seen unknown more than
    ``grace_s`` ago *and* a list received after that moment still lacks it, so a stale list
    never quarantines anything. The clock is the caller's (monotonic seconds).
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._known: frozenset[str] | None = None
        self._known_at: float | None = None
        self._unknown_since: dict[str, float] = {}

    def update_known(self, machine_ids: Iterable[str], now: float) -> None:
        """Record the control plane's latest list."""
        self._known = frozenset(machine_ids)
        self._known_at = now
        # Known again, even briefly: its grace period starts over.
        for machine_id in self._known & set(self._unknown_since):
            del self._unknown_since[machine_id]

    def is_orphan(self, machine_id: str) -> bool:
        """Absent from the latest list (False while no list has arrived)."""
        return self._known is not None and machine_id not in self._known

    def is_known(self, machine_id: str) -> bool:
        """Named by the latest list (False while no list has arrived)."""
        return self._known is not None and machine_id in self._known

    def sweep(self, present: Iterable[str], now: float) -> list[str]:
        """Note which present machines are orphans; return those due for quarantine."""
        present = set(present)
        for gone in set(self._unknown_since) - present:
            del self._unknown_since[gone]
        due = []
        for machine_id in sorted(present):
            if not self.is_orphan(machine_id) or self._known_at is None:
                self._unknown_since.pop(machine_id, None)
                continue
            since = self._unknown_since.setdefault(machine_id, now)
            if now - since >= self.grace_s and self._known_at >= since:
                due.append(machine_id)
        return due

    def forget(self, machine_id: str) -> None:
        """Stop tracking a machine that was removed or quarantined."""
        self._unknown_since.pop(machine_id, None)


class ListVerdict(StrEnum):
    """What an agent does with a ``machines.known`` list, given the cluster it belongs to."""

    ADOPT = "adopt"  # the first id this agent hears: it joins that cluster, and uses the list
    ACCEPT = "accept"  # its own cluster's list
    FOREIGN = "foreign"  # another control plane's (a wrong database, a staging gateway): ignored
    ANONYMOUS = "anonymous"  # no id (a gateway older than cluster ids): ignored, removes nothing


def admit_list(adopted: str | None, incoming: str | None) -> ListVerdict:
    """Whether a list of ``incoming``'s cluster may steer an agent that adopted ``adopted``."""
    if incoming is None:
        return ListVerdict.ANONYMOUS
    if adopted is None:
        return ListVerdict.ADOPT
    return ListVerdict.ACCEPT if incoming == adopted else ListVerdict.FOREIGN


class Ownership(StrEnum):
    """Whose a labelled container on this engine is, as this agent sees it."""

    MINE = "mine"  # labelled with this host (and this cluster, or none yet)
    LEGACY = "legacy"  # made before the host label, its disk under this agent's state dir
    FOREIGN = "foreign"  # another host's or cluster's, or unlabelled with no disk here


def ownership(
    labels: dict[str, str], host_id: str, cluster_id: str | None, *, has_disk: bool
) -> Ownership:
    """Whose the container with ``labels`` is. Only ``MINE`` may ever be quarantined: a legacy
    container (no ``dockvm.host``) is reported and healed, but which control plane made it is
    unknowable, so it is never taken for an orphan."""
    host = labels.get(LABEL_HOST)
    if host is None:
        return Ownership.LEGACY if has_disk else Ownership.FOREIGN
    if host != host_id:
        return Ownership.FOREIGN
    cluster = labels.get(LABEL_CLUSTER) or None
    if cluster is not None and cluster_id is not None and cluster != cluster_id:
        return Ownership.FOREIGN
    return Ownership.MINE


@dataclass(frozen=True, slots=True)
class SweepPlan:
    """Which due orphans one sweep quarantines; ``refused`` says why it quarantines none."""

    quarantine: tuple[str, ...]
    refused: str | None = None


def plan_sweep(due: Iterable[str], present: int, *, cap: int, fraction: float) -> SweepPlan:
    """Quarantine every due orphan, or none when they are too many: more than ``cap``, or
    (when more than one) more than ``fraction`` of the ``present`` machines. A mass
    disappearance is more likely a control-plane fault than real orphans."""
    due = tuple(due)
    if len(due) > cap:
        return SweepPlan((), f"{len(due)} orphans due exceed the cap of {cap} per sweep")
    if len(due) > 1 and len(due) > fraction * present:
        return SweepPlan(
            (), f"{len(due)} orphans due of {present} machines exceed the fraction {fraction:g}"
        )
    return SweepPlan(due)


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    """A quarantined machine, as kept in the agent's state dir until purged or released."""

    machine_id: str
    container_id: str | None
    was_running: bool
    quarantined_at: datetime
    cluster_id: str | None = None

    def purge_after(self, retention_s: float) -> datetime:
        """When the retention deletes it."""
        return self.quarantined_at + timedelta(seconds=retention_s)


def expired(records: Iterable[QuarantineRecord], now: datetime, retention_s: float) -> list[str]:
    """The quarantined machines whose retention has run out at ``now``."""
    return sorted(r.machine_id for r in records if r.purge_after(retention_s) <= now)
