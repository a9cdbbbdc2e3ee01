"""Volume drivers: one data disk per machine, with a hard size, mounted at ``/data``.

Both drivers share one code path (mkfs.xfs, mount under the state directory, xfs_growfs to grow
online, unmount on destroy) and differ only in how they make, find, grow and remove the block
device:
- ``xfs``: a sparse image file under ``$DOCKVM_STATE_DIR/volumes`` on a loop device;
- ``lvm``: one logical volume per machine on a configured volume group.

Every operation is idempotent by machine_id, so a create repeated after a crash reuses what the
first attempt left. XFS cannot shrink, so shrinking is refused upstream (domain.plan_resize).
"""

from __future__ import annotations

import asyncio
import os
from collections import defaultdict
from pathlib import Path
from typing import Protocol

import structlog

from libs.common.contracts.provisioner import XFS_MIN_DISK_BYTES

from ..domain import free_disk
from .host import DEFAULT_TIMEOUT_S, HostCommandFailed, HostCommands

__all__ = ["LvmVolumes", "VolumeDriver", "XfsLoopVolumes", "make_volumes"]

log = structlog.get_logger("provisioner.volumes")


class VolumeDriver(Protocol):
    """Port: the machines' data disks."""

    # The smallest disk it can make (reported in the heartbeat; the gateway refuses less).
    min_size: int

    def path(self, machine_id: str) -> Path:
        """Where the machine's filesystem is mounted on the host (bound to ``/data``)."""
        ...

    async def ensure(self, machine_id: str, size: int) -> Path:
        """Make (or reuse) the machine's disk, formatted and mounted; return the mountpoint."""
        ...

    async def mount(self, machine_id: str) -> bool | None:
        """Re-attach and mount an existing disk; None if there is none, True if it mounted now."""
        ...

    async def size(self, machine_id: str) -> int | None:
        """The disk's size in bytes, or None if it has none."""
        ...

    async def grow(self, machine_id: str, size: int) -> None:
        """Grow the disk online to ``size`` bytes."""
        ...

    async def destroy(self, machine_id: str) -> bool:
        """Unmount and remove the disk and its device; False if there was none."""
        ...

    async def list(self) -> list[str]:
        """The machine_ids that have a disk."""
        ...

    async def capacity(self) -> tuple[int, int]:
        """(total, free) bytes for disks; free counts sparse disks as fully written."""
        ...


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == target for line in f)


class _BlockVolumes:
    """The shared path: block device → mkfs.xfs → mount → xfs_growfs → unmount."""

    min_size = XFS_MIN_DISK_BYTES  # mkfs.xfs makes nothing smaller, on a loop device or an LV

    def __init__(self, state_dir: Path, command_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.root = state_dir / "volumes"
        self.host = HostCommands(command_timeout_s)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def path(self, machine_id: str) -> Path:
        """Where the machine's filesystem is mounted on the host."""
        return self.root / "mnt" / machine_id

    # The block-device steps each driver provides.
    async def _device(self, machine_id: str) -> str | None:
        raise NotImplementedError

    async def _attach(self, machine_id: str) -> str | None:
        raise NotImplementedError

    async def _make_device(self, machine_id: str, size: int) -> str:
        raise NotImplementedError

    async def _grow_device(self, machine_id: str, device: str, size: int) -> None:
        raise NotImplementedError

    async def _remove_device(self, machine_id: str, device: str | None) -> bool:
        raise NotImplementedError

    async def size(self, machine_id: str) -> int | None:
        """The disk's size in bytes, or None."""
        raise NotImplementedError

    async def _mount(self, machine_id: str, device: str) -> bool:
        mnt = self.path(machine_id)
        mnt.mkdir(parents=True, exist_ok=True)
        if _mounted(mnt):
            return False
        # -p probes the device itself: blkid's cache (/run/blkid) trusts an entry younger than
        # 2 s unprobed, so a loop device just reused for a new, empty disk read as the xfs of
        # the disk it held before, mkfs was skipped, and the mount failed (bench/api.py, 50
        # machines). Worse, a stale "no fs" would format a disk that has one.
        fs = await self.host.run(
            "blkid", "-p", "-o", "value", "-s", "TYPE", device, check=False
        )
        if fs.strip() != "xfs":
            await self.host.run("mkfs.xfs", "-q", device)
        await self.host.run("mount", "-t", "xfs", "-o", "nodev", device, str(mnt))
        return True

    async def ensure(self, machine_id: str, size: int) -> Path:
        """Make (or reuse) the machine's disk, formatted and mounted."""
        async with self._locks[machine_id]:
            self.root.mkdir(parents=True, exist_ok=True)
            device = await self._device(machine_id) or await self._attach(machine_id)
            if device is None:
                device = await self._make_device(machine_id, size)
                log.info("volume created", machine_id=machine_id, device=device, size=size)
            await self._mount(machine_id, device)
            return self.path(machine_id)

    async def mount(self, machine_id: str) -> bool | None:
        """Re-attach and mount an existing disk (after a host reboot)."""
        async with self._locks[machine_id]:
            device = await self._device(machine_id) or await self._attach(machine_id)
            if device is None:
                return None
            return await self._mount(machine_id, device)

    async def grow(self, machine_id: str, size: int) -> None:
        """Grow the device, then the mounted filesystem, online."""
        async with self._locks[machine_id]:
            device = await self._device(machine_id)
            if device is None or not _mounted(self.path(machine_id)):
                raise HostCommandFailed(("grow", machine_id), 1, "the volume is not mounted")
            await self._grow_device(machine_id, device, size)
            await self.host.run("xfs_growfs", str(self.path(machine_id)))

    async def destroy(self, machine_id: str) -> bool:
        """Unmount, then remove the device and its backing store."""
        async with self._locks[machine_id]:
            mnt = self.path(machine_id)
            if mnt.exists() and _mounted(mnt):
                try:
                    await self.host.run("umount", str(mnt))
                except HostCommandFailed:
                    # Something still holds it: detach now, the kernel frees it when released.
                    log.warning("volume busy, lazy unmount", machine_id=machine_id)
                    await self.host.run("umount", "-l", str(mnt))
            removed = await self._remove_device(machine_id, await self._device(machine_id))
            if mnt.exists():
                mnt.rmdir()
            self._locks.pop(machine_id, None)
            return removed


# Attaches tried before giving up, when each is handed a device another attach won.
_ATTACH_TRIES = 5


def _backing_file(device: str) -> str | None:
    """The file behind loop ``device`` now (the kernel's word), or None."""
    try:
        sys_file = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
        return sys_file.read_text().strip()
    except OSError:
        return None


class XfsLoopVolumes(_BlockVolumes):
    """``xfs``: a sparse image file per machine on a loop device."""

    def image(self, machine_id: str) -> Path:
        """The machine's backing file."""
        return self.root / f"{machine_id}.img"

    async def _device(self, machine_id: str) -> str | None:
        img = self.image(machine_id)
        if not img.exists():
            return None
        out = await self.host.run("losetup", "-n", "-O", "NAME", "-j", str(img))
        devices = out.split()
        return devices[0] if devices else None

    async def _attach(self, machine_id: str) -> str | None:
        img = self.image(machine_id)
        if not img.exists():
            return None
        for _ in range(_ATTACH_TRIES):
            named = (await self.host.run("losetup", "--find", "--show", str(img))).strip()
            if _backing_file(named) == str(img.resolve()):
                return named
            # Two attaches at once (ours, another agent's, anyone's) can be handed the same free
            # device, and losetup may then print a device that holds another file: formatting
            # or mounting that name would reach another machine's disk. Ours, if attached at
            # all, is found by its file.
            log.warning("losetup named a device of another file", machine_id=machine_id,
                        device=named)
            found = await self._device(machine_id)
            if found is not None:
                return found
        raise HostCommandFailed(
            ("losetup", "--find", "--show", str(img)), 1,
            f"no loop device holds {img} after {_ATTACH_TRIES} attaches",
        )

    async def _make_device(self, machine_id: str, size: int) -> str:
        img = self.image(machine_id)
        tmp = img.with_suffix(".tmp")
        # Sparse, and renamed into place so a crash never leaves a half-sized image behind.
        tmp.touch()
        os.truncate(tmp, size)
        tmp.rename(img)
        attached = await self._attach(machine_id)
        if attached is None:
            raise HostCommandFailed(("losetup", str(img)), 1, "the image vanished before attach")
        return attached

    async def _grow_device(self, machine_id: str, device: str, size: int) -> None:
        os.truncate(self.image(machine_id), size)
        await self.host.run("losetup", "-c", device)

    async def _remove_device(self, machine_id: str, device: str | None) -> bool:
        img = self.image(machine_id)
        img.with_suffix(".tmp").unlink(missing_ok=True)  # a create cut short before the rename
        if img.exists():
            out = await self.host.run("losetup", "-n", "-O", "NAME", "-j", str(img))
            for dev in out.split():
                await self.host.run("losetup", "-d", dev)
            img.unlink()
            return True
        return device is not None

    async def size(self, machine_id: str) -> int | None:
        """The image file's size."""
        img = self.image(machine_id)
        return img.stat().st_size if img.exists() else None

    async def list(self) -> list[str]:
        """Machines with an image file."""
        if not self.root.exists():
            return []
        return sorted(p.stem for p in self.root.glob("*.img"))

    async def capacity(self) -> tuple[int, int]:
        """The state filesystem's size, and its free bytes less what sparse images may claim."""
        self.root.mkdir(parents=True, exist_ok=True)
        st = os.statvfs(self.root)
        images = [p.stat() for p in self.root.glob("*.img")]
        sparse = ((s.st_size, s.st_blocks * 512) for s in images)
        free = free_disk(st.f_bavail * st.f_frsize, sparse)
        return st.f_blocks * st.f_frsize, free


class LvmVolumes(_BlockVolumes):
    """``lvm``: one logical volume ``dockvm-<machine_id>`` per machine on volume group ``vg``."""

    def __init__(
        self, state_dir: Path, vg: str, command_timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> None:
        super().__init__(state_dir, command_timeout_s)
        self.vg = vg

    def _lv(self, machine_id: str) -> str:
        return f"{self.vg}/dockvm-{machine_id}"

    async def _device(self, machine_id: str) -> str | None:
        out = await self.host.run(
            "lvs", "--noheadings", "-o", "lv_path", self._lv(machine_id), check=False
        )
        return out.strip() or None

    async def _attach(self, machine_id: str) -> str | None:
        # An existing LV is active with its VG; there is nothing to attach.
        return None

    async def _make_device(self, machine_id: str, size: int) -> str:
        name = self._lv(machine_id).split("/", 1)[1]
        await self.host.run("lvcreate", "-y", "-L", f"{size}b", "-n", name, self.vg)
        device = await self._device(machine_id)
        if device is None:
            raise HostCommandFailed(("lvs", self._lv(machine_id)), 1, "no LV after lvcreate")
        return device

    async def _grow_device(self, machine_id: str, device: str, size: int) -> None:
        await self.host.run("lvextend", "-L", f"{size}b", self._lv(machine_id))

    async def _remove_device(self, machine_id: str, device: str | None) -> bool:
        if device is None:
            return False
        await self.host.run("lvremove", "-f", self._lv(machine_id))
        return True

    async def size(self, machine_id: str) -> int | None:
        """The LV's size."""
        out = await self.host.run(
            "lvs", "--noheadings", "--units", "b", "--nosuffix", "-o", "lv_size",
            self._lv(machine_id), check=False,
        )  # fmt: skip
        return int(float(out.strip())) if out.strip() else None

    async def list(self) -> list[str]:
        """Machines with an LV on the VG."""
        out = await self.host.run("lvs", "--noheadings", "-o", "lv_name", self.vg, check=False)
        return sorted(n[len("dockvm-") :] for n in out.split() if n.startswith("dockvm-"))

    async def capacity(self) -> tuple[int, int]:
        """The VG's size and free extents."""
        out = await self.host.run(
            "vgs", "--noheadings", "--units", "b", "--nosuffix", "-o", "vg_size,vg_free", self.vg
        )
        total, free = (int(float(x)) for x in out.split())
        return total, free


def make_volumes(
    kind: str, state_dir: Path, *, vg: str, command_timeout_s: float = DEFAULT_TIMEOUT_S
) -> VolumeDriver:
    """The volume driver named by the ``volume_driver`` setting."""
    if kind == "xfs":
        return XfsLoopVolumes(state_dir, command_timeout_s)
    if kind == "lvm":
        return LvmVolumes(state_dir, vg, command_timeout_s)
    raise ValueError(f"unknown volume driver {kind!r}")
