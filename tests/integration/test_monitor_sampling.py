"""The sampler's figures against real containers on the real engine (cgroup v1 files, netns).

The monitor reads files only; these tests drive real workloads and compare with what was done,
and with ``/proc/meminfo`` seen inside the container through LXCFS.
"""

from __future__ import annotations

import os
import time

import pytest

from services.monitor.adapters import host_cpus, host_memory, make_reader, read_net
from services.monitor.domain import ContainerMeta
from services.monitor.sampler import Sampler, Target

from .test_monitor_support import Sandbox, sandbox, wait_until  # noqa: F401

MB = 1 << 20

SERVER = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5000)); s.listen(1)
while True:
    c, _ = s.accept()
    while c.recv(65536):
        pass
    c.close()
"""

CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 5000))
c.sendall(b"x" * (8 << 20))
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


def _proc_cpu_s(container_id: str) -> float:
    """utime + stime of the container's processes, from each /proc/<pid>/stat."""
    total = 0
    with open(f"/sys/fs/cgroup/pids/docker/{container_id}/cgroup.procs") as procs:
        for pid in procs.read().split():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _comms(container_id: str) -> list[str]:
    """The command names of the container's processes."""
    with open(f"/sys/fs/cgroup/pids/docker/{container_id}/cgroup.procs") as procs:
        pids = procs.read().split()
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as f:
                out.append(f.read().strip())
        except FileNotFoundError:
            continue
    return out


def _sampler() -> Sampler:
    return Sampler(make_reader(), read_net, host_cpus=host_cpus(), host_memory=host_memory())


def _target(container) -> dict[str, Target]:
    container.reload()
    meta = ContainerMeta.from_labels(container.id, container.labels)
    assert meta is not None
    return {container.id: Target(meta, container.attrs["State"]["Pid"])}


def test_cpu_burn_under_half_a_cpu_reads_fifty_percent_of_a_core(sandbox: Sandbox):  # noqa: F811
    # A heavy cpu.shares weight: on a CI host shared with other test runs the burner still
    # gets the whole of its quota (the quota caps it; the weight only wins contention).
    container, _, _ = sandbox.run_container("burn", ["python3", "-c", "while True: pass"],
                                            cpus=0.5, cpu_shares=20000)
    # dockvm-init makes the ssh host keys first (CPU of processes that will have exited)
    wait_until(lambda: "python3" in _comms(container.id), what="the burner to run")
    sampler, target = _sampler(), _target(container)
    sampler.round(target)
    proc_before = _proc_cpu_s(container.id)
    time.sleep(5)
    (sample, _), = sampler.round(target)
    # the kernel's per-process accounting, an independent source for the same interval
    proc_cores = (_proc_cpu_s(container.id) - proc_before) / sample.interval_s
    assert sample.cpu_cores == pytest.approx(proc_cores, abs=0.05)
    assert sample.cpu_quota_cpus == 0.5
    assert sample.cpu_cores * 100 == pytest.approx(50, abs=10)
    # ...which is the whole of its own quota
    assert sample.cpu_percent == pytest.approx(100, abs=20)
    assert sample.cpu_throttled_periods > 0


def test_allocating_100mb_raises_memory_by_about_100mb_as_free_shows_inside(
    sandbox: Sandbox,  # noqa: F811
):
    container, _, _ = sandbox.run_container("mem", ["sleep", "infinity"], memory="512m",
                                            lxcfs=True)
    sampler, target = _sampler(), _target(container)
    (before, _), = sampler.round(target)
    sandbox.exec(container.id, ["python3", "-c",
                                "import time; b = b'x' * (100 << 20); time.sleep(600)"],
                 detach=True)
    after = wait_until(
        lambda: next(
            (s for s, _ in sampler.round(target)
             if s.mem_working_set - before.mem_working_set > 95 * MB),
            None,
        ),
        timeout=30, what="the 100 MB to show",
    )
    meminfo = dict(
        (line.split(":")[0], int(line.split()[1]) * 1024)
        for line in sandbox.exec(container.id, ["cat", "/proc/meminfo"]).splitlines()
    )
    (now, _), = sampler.round(target)
    assert after.mem_working_set - before.mem_working_set < 115 * MB
    assert now.mem_limit == meminfo["MemTotal"] == 512 * MB
    assert abs(now.mem_usage - (meminfo["MemTotal"] - meminfo["MemFree"])) < 8 * MB


def test_traffic_between_two_containers_matches_the_bytes_sent(sandbox: Sandbox):  # noqa: F811
    server, _, server_ip = sandbox.run_container("srv", ["python3", "-c", SERVER])
    client, _, _ = sandbox.run_container("cli", ["sleep", "infinity"])
    sampler = _sampler()
    targets = {**_target(server), **_target(client)}
    # port 5000 is 0x1388 in /proc/net/tcp
    wait_until(lambda: ":1388" in sandbox.exec(server.id, ["cat", "/proc/net/tcp"]),
               what="the server to listen")
    before = {s.container_id: s for s, _ in sampler.round(targets)}
    sandbox.exec(client.id, ["python3", "-c", CLIENT, server_ip])
    after = {s.container_id: s for s, _ in sampler.round(targets)}
    received = after[server.id].net_rx_bytes - before[server.id].net_rx_bytes
    sent = after[client.id].net_tx_bytes - before[client.id].net_tx_bytes
    payload = 8 * MB
    # TCP/IP/Ethernet headers add ~3.5% at a 1500 MTU; nothing else talks on this network.
    assert payload <= received <= payload * 1.06
    assert payload <= sent <= payload * 1.06
    assert after[server.id].pids >= 1
