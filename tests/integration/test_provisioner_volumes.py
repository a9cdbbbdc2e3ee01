"""The VolumeDriver contract, against the in-memory fake and the real XFS-on-loop driver (real
losetup, mkfs.xfs, mount and xfs_growfs under a temporary state directory)."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.provisioner.adapters import XfsLoopVolumes
from services.provisioner.adapters.host import HostCommands, run
from services.provisioner.fakes import MemoryVolumes

M = 1 << 20


def _loops(state: Path) -> list[str]:
    out = subprocess.run(["losetup", "-a", "-n", "-O", "NAME,BACK-FILE"], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    return [line.split()[0] for line in out.splitlines() if str(state) in line]


@pytest.fixture(params=["memory", "xfs"])
async def volumes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator:
    """The fake, or real XFS volumes whose mounts and loop devices are removed afterwards."""
    if request.param == "memory":
        yield MemoryVolumes()
        return
    yield XfsLoopVolumes(tmp_path)
    _release(tmp_path)


def _release(state: Path) -> None:
    """Unmount and detach whatever a failed test left under ``state``."""
    with open("/proc/self/mounts") as f:
        mounts = [line.split()[1] for line in f if str(state) in line]
    for mnt in mounts:
        subprocess.run(["umount", "-l", mnt], check=False)
    for dev in _loops(state):
        subprocess.run(["losetup", "-d", dev], check=False)


async def test_volume_contract(volumes):
    total, free_before = await volumes.capacity()

    path = await volumes.ensure("v1", 400 * M)
    again = await volumes.ensure("v1", 400 * M)  # idempotent: reuses, never re-formats
    size = await volumes.size("v1")
    await volumes.grow("v1", 600 * M)
    grown = await volumes.size("v1")
    listed = await volumes.list()
    _, free_during = await volumes.capacity()
    removed = await volumes.destroy("v1")
    removed_again = await volumes.destroy("v1")

    assert path == again == volumes.path("v1")
    assert (size, grown) == (400 * M, 600 * M)
    assert listed == ["v1"]
    assert total > 0 and free_during <= free_before - 600 * M + 64 * M
    assert (removed, removed_again) == (True, False)
    assert await volumes.list() == []
    assert await volumes.size("v1") is None
    assert await volumes.mount("v1") is None


async def test_xfs_grows_online_and_leaves_no_loop_device(tmp_path):
    vols = XfsLoopVolumes(tmp_path)
    try:
        mnt = await vols.ensure("v2", 400 * M)
        (mnt / "keep").write_text("data")
        before = os.statvfs(mnt)
        await vols.grow("v2", 800 * M)
        after = os.statvfs(mnt)
        kept = (mnt / "keep").read_text()
        loops_while_mounted = _loops(tmp_path)
    finally:
        await vols.destroy("v2")

    assert after.f_blocks * after.f_frsize > before.f_blocks * before.f_frsize + 300 * M
    assert kept == "data"
    assert len(loops_while_mounted) == 1
    assert _loops(tmp_path) == []
    assert not (tmp_path / "volumes" / "v2.img").exists()


class _LosetupNamesTheDecoy(HostCommands):
    """Real commands; the first ``losetup --find --show`` attaches for real but prints the
    device of a decoy file, as a race between two attaches can make it do."""

    def __init__(self, decoy_device: str) -> None:
        super().__init__()
        self.decoy_device, self.lied = decoy_device, False

    async def run(self, *argv: str, check: bool = True, input: bytes | None = None) -> str:
        out = await super().run(*argv, check=check, input=input)
        if argv[:3] == ("losetup", "--find", "--show") and not self.lied:
            self.lied = True
            return self.decoy_device + "\n"
        return out


async def test_a_loop_device_named_for_another_file_is_never_formatted_or_mounted(tmp_path):
    decoy = tmp_path / "decoy.img"
    decoy.touch()
    os.truncate(decoy, 300 * M)
    decoy_dev = (await run("losetup", "--find", "--show", str(decoy))).strip()
    vols = XfsLoopVolumes(tmp_path)
    vols.host = _LosetupNamesTheDecoy(decoy_dev)
    try:
        mnt = await vols.ensure("v3", 400 * M)
        with open("/proc/self/mounts") as f:
            device = next(line.split()[0] for line in f if line.split()[1] == str(mnt))
        backing = Path(f"/sys/block/{Path(device).name}/loop/backing_file").read_text().strip()
        decoy_fs = (await run("blkid", "-o", "value", "-s", "TYPE", decoy_dev, check=False)).strip()
        await vols.destroy("v3")
    finally:
        await run("losetup", "-d", decoy_dev, check=False)
        _release(tmp_path)

    assert vols.host.lied
    assert device != decoy_dev
    assert backing == str((tmp_path / "volumes" / "v3.img").resolve())
    assert decoy_fs == ""  # the decoy was never formatted


async def test_many_disks_made_at_once_by_two_agents_each_get_their_own_device(tmp_path):
    a, b = XfsLoopVolumes(tmp_path / "a"), XfsLoopVolumes(tmp_path / "b")
    names = [(vols, f"p{i}") for i in range(6) for vols in (a, b)]
    try:
        mnts = await asyncio.gather(*(vols.ensure(mid, 300 * M) for vols, mid in names))
        with open("/proc/self/mounts") as f:
            devices = {line.split()[1]: line.split()[0] for line in f}
        backing = {
            str(m): Path(f"/sys/block/{Path(devices[str(m)]).name}/loop/backing_file")
            .read_text().strip()
            for m in mnts
        }
        await asyncio.gather(*(vols.destroy(mid) for vols, mid in names))
    finally:
        _release(tmp_path)

    assert len({devices[str(m)] for m in mnts}) == len(names)
    assert all(backing[str(m)].endswith(f"/volumes/{m.name}.img") for m in mnts)


async def test_a_loop_device_reused_at_once_for_an_empty_disk_is_formatted(tmp_path):
    """blkid's cache trusts an entry younger than 2 s: a device that held an XFS disk a moment
    ago must not read as XFS once it holds a new, empty one."""
    old, new = tmp_path / "old.img", tmp_path / "volumes" / "v4.img"
    new.parent.mkdir(parents=True)
    for f in (old, new):
        f.touch()
        os.truncate(f, 300 * M)
    dev = (await run("losetup", "--find", "--show", str(old))).strip()
    await run("mkfs.xfs", "-q", dev)
    cached = (await run("blkid", "-o", "value", "-s", "TYPE", dev, check=False)).strip()
    await run("losetup", "-d", dev)
    await run("losetup", dev, str(new))  # the same device, now the new machine's empty disk
    vols = XfsLoopVolumes(tmp_path)
    try:
        mounted = await vols._mount("v4", dev)
        (vols.path("v4") / "ok").write_text("x")
    finally:
        _release(tmp_path)

    assert cached == "xfs"
    assert mounted is True
