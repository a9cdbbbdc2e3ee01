# ruff: noqa: E501  (a recorded /proc/net/dev keeps its real line width)
"""The cgroup v1/v2 readers and the net/dev parser on recorded file trees (no real /sys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.monitor.adapters import (
    CgroupUnavailable,
    CgroupV1Reader,
    CgroupV2Reader,
    CgroupVersion,
    detect_version,
    make_reader,
    parse_docker_time,
    parse_net_dev,
)

CID = "abc123"

NET_DEV = b"""Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     999       9    0    0    0     0          0         0      999       9    0    0    0     0       0          0
  eth0:    1200      12    0    0    0     0          0         0      300       3    0    0    0     0       0          0
  eth1:      34       1    0    0    0     0          0         0       66       2    0    0    0     0       0          0
"""


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _v1_tree(root: Path, group: str = f"docker/{CID}") -> None:
    _write(
        root,
        {
            f"cpu/{group}/cpu.stat": "nr_periods 10\nnr_throttled 4\nthrottled_time 2000000\n",
            f"cpu/{group}/cpu.cfs_quota_us": "50000\n",
            f"cpu/{group}/cpu.cfs_period_us": "100000\n",
            f"cpuacct/{group}/cpuacct.usage": "123456789\n",
            f"memory/{group}/memory.usage_in_bytes": "1000000\n",
            f"memory/{group}/memory.limit_in_bytes": "268435456\n",
            f"memory/{group}/memory.stat": (
                "cache 1\nrss 2\ninactive_file 3\ntotal_cache 400000\ntotal_rss 500000\n"
                "total_inactive_file 100000\n"
            ),
            f"memory/{group}/memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
            f"blkio/{group}/blkio.throttle.io_service_bytes_recursive": (
                "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Total 12288\n"
                "8:16 Read 1\n8:16 Write 2\nTotal 12291\n"
            ),
            f"blkio/{group}/blkio.throttle.io_serviced_recursive": (
                "8:0 Read 3\n8:0 Write 5\n8:0 Total 8\nTotal 8\n"
            ),
            f"pids/{group}/pids.current": "7\n",
        },
    )


def _v2_tree(root: Path, group: str = f"system.slice/docker-{CID}.scope") -> None:
    _write(
        root,
        {
            "cgroup.controllers": "cpu memory io pids\n",
            f"{group}/cpu.stat": (
                "usage_usec 123456\nuser_usec 1\nsystem_usec 2\nnr_periods 10\n"
                "nr_throttled 4\nthrottled_usec 2000\n"
            ),
            f"{group}/cpu.max": "50000 100000\n",
            f"{group}/memory.current": "1000000\n",
            f"{group}/memory.max": "max\n",
            f"{group}/memory.stat": "anon 500000\nfile 400000\ninactive_file 100000\n",
            f"{group}/memory.events": "low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n",
            f"{group}/io.stat": (
                "8:0 rbytes=4096 wbytes=8192 rios=3 wios=5 dbytes=0 dios=0\n"
                "8:16 rbytes=1 wbytes=2 rios=0 wios=0 dbytes=0 dios=0\n"
            ),
            f"{group}/pids.current": "7\n",
        },
    )


EXPECTED = dict(
    nr_throttled=4, throttled_ns=2_000_000, quota_cpus=0.5, mem_usage=1_000_000,
    mem_rss=500_000, mem_cache=400_000, mem_inactive_file=100_000, oom_kills=2,
    blk_read_bytes=4097, blk_write_bytes=8194, blk_read_ops=3, blk_write_ops=5, pids=7,
)


def _picked(stats) -> dict:
    return {k: getattr(stats, k) for k in EXPECTED}


def test_v1_reader_normalises_the_v1_files(tmp_path: Path):
    _v1_tree(tmp_path)
    stats = CgroupV1Reader(tmp_path, tmp_path / "proc").read(CID, None)
    assert _picked(stats) == EXPECTED
    assert (stats.cpu_usage_ns, stats.mem_limit) == (123_456_789, 268_435_456)


def test_v2_reader_normalises_the_v2_files_found_through_the_pid(tmp_path: Path):
    root, proc = tmp_path / "cg", tmp_path / "proc"
    _v2_tree(root)
    _write(proc, {"42/cgroup": f"0::/system.slice/docker-{CID}.scope\n"})
    stats = CgroupV2Reader(root, proc).read(CID, 42)
    assert _picked(stats) == EXPECTED
    assert (stats.cpu_usage_ns, stats.mem_limit) == (123_456_000, None)


def test_v1_reader_follows_the_pid_to_a_systemd_style_path(tmp_path: Path):
    root, proc = tmp_path / "cg", tmp_path / "proc"
    group = f"system.slice/docker-{CID}.scope"
    _v1_tree(root, group)
    lines = "".join(
        f"{i}:{c}:/{group}\n" for i, c in enumerate(["cpu,cpuacct", "memory", "blkio", "pids"])
    )
    # cpu,cpuacct co-mounted: the kernel names both, each dir exists under its own name
    _write(proc, {"42/cgroup": lines + "0::/\n"})
    assert _picked(CgroupV1Reader(root, proc).read(CID, 42)) == EXPECTED


@pytest.mark.parametrize(("pid", "files"), [(None, {}), (42, {})])
def test_a_missing_cgroup_is_unavailable(tmp_path: Path, pid, files):
    with pytest.raises(CgroupUnavailable):
        CgroupV1Reader(tmp_path, tmp_path / "proc").read(CID, pid)


@pytest.mark.parametrize(
    ("tree", "version"), [(_v1_tree, CgroupVersion.V1), (_v2_tree, CgroupVersion.V2)]
)
def test_detection_picks_the_reader_of_the_mounted_hierarchy(tmp_path: Path, tree, version):
    tree(tmp_path)
    assert (detect_version(tmp_path), make_reader(tmp_path).version) == (version, version)


def test_net_dev_sums_every_interface_but_loopback():
    net = parse_net_dev(NET_DEV)
    assert (net.rx_bytes, net.rx_packets, net.tx_bytes, net.tx_packets) == (1234, 13, 366, 5)


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("0001-01-01T00:00:00Z", 0),
        ("2026-11-27T00:00:01.5Z", 1_795_737_601_500_000_000),
        ("2026-11-27T00:00:01.123456789Z", 1_795_737_601_123_456_789),
        ("2026-11-27T01:00:01.000000001+01:00", 1_795_737_601_000_000_001),
    ],
)
def test_docker_times_parse_to_nanoseconds(text, ns):
    assert parse_docker_time(text) == ns
