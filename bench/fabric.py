"""Benchmark: the local datacenter's fabric (scripts/hosts.sh) against a plain veth.

In one run, with the same Python programs at both ends:

- ``fabric``: two machines (containers of hosts h1 and h2, attached by the provisioner's ovs
  driver on VLAN 3169, 10.231.69.0/24): machine veth → host bridge → bonded uplink → ToR → the
  other host's bond → bridge → veth, all on OVS's userspace datapath;
- ``veth``: two network namespaces joined by one veth (the kernel alone).

It prints TCP throughput (one stream, ``--seconds``), UDP round-trip latency (p50/p99 over
``--rtts`` ping-pongs) and, ``--failovers`` times, the bond failover: h1's active uplink is set
down while a UDP probe runs every millisecond; the longest gap between replies is the recovery
time, and the probes without a reply are the packets lost.

Uses hosts h1 and h2 of a running multi-host stack, else brings up two of its own (without
agents) and takes them down after; it removes what it made.
Usage: ``.venv/bin/python -m bench.fabric [--seconds 3] [--rtts 500] [--failovers 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import docker

from bench._common import machine, median
from services.provisioner.adapters.network import OvsNetwork
from services.provisioner.adapters.runtime import ContainerInfo
from services.provisioner.domain import LABEL_GATEWAY, LABEL_IP, LABEL_PREFIX, LABEL_VLAN

HOSTS_RUN = Path("/run/dockvm/hosts")
HOSTS_SH = Path(__file__).resolve().parents[1] / "scripts" / "hosts.sh"
IMAGE = "dockvm/base:bookworm"
VLAN, NET = 3169, "10.231.69"
RUN = uuid.uuid4().hex[:6]

# The one program both ends run: a server (TCP sink, UDP echo) or one of the clients.
PROG = r"""
import json, socket, sys, threading, time
mode = sys.argv[1]
if mode == "serve":
    def sink():
        s = socket.create_server(("", 7001))
        while True:
            c, _ = s.accept()
            while c.recv(1 << 20):
                pass
            c.close()
    threading.Thread(target=sink, daemon=True).start()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("", 7002))
    while True:
        d, a = u.recvfrom(64); u.sendto(d, a)
host = sys.argv[2]
if mode == "tcp":
    for _ in range(100):
        try: s = socket.create_connection((host, 7001), timeout=2); break
        except OSError: time.sleep(0.1)
    buf, sent, t0 = b"x" * (1 << 20), 0, time.monotonic()
    while time.monotonic() - t0 < float(sys.argv[3]):
        s.sendall(buf); sent += len(buf)
    s.close(); print(json.dumps({"mbit_s": sent * 8 / (time.monotonic() - t0) / 1e6}))
elif mode == "rtt":
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(1); rtts = []
    for i in range(int(sys.argv[3])):
        t0 = time.perf_counter(); u.sendto(b"p", (host, 7002))
        try: u.recvfrom(64); rtts.append((time.perf_counter() - t0) * 1e6)
        except socket.timeout: pass
    print(json.dumps({"rtts_us": rtts}))
elif mode == "probe":
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.setblocking(False)
    got, n, t_end = [], 0, time.monotonic() + float(sys.argv[3])
    while time.monotonic() < t_end:
        u.sendto(b"q", (host, 7002)); n += 1
        time.sleep(0.001)
        while True:
            try: u.recvfrom(64); got.append(time.monotonic())
            except BlockingIOError: break
    gaps = [b - a for a, b in zip(got, got[1:])]
    print(json.dumps({"sent": n, "received": len(got), "max_gap_ms": max(gaps) * 1000}))
"""


def sh(*args: str, check: bool = True) -> str:
    """Run a host command; its stdout."""
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=120).stdout


class Machines:
    """Two containers on h1 and h2 of the fabric, removed by ``close``."""

    def __init__(self) -> None:
        self.clients = {h: docker.DockerClient(base_url=f"unix://{HOSTS_RUN / h / 'docker.sock'}")
                        for h in ("h1", "h2")}  # fmt: skip
        self.made: list[tuple[str, str, object]] = []

    def start(self, host: str, ip: str) -> object:
        """A machine with ``ip`` on ``VLAN``, plumbed by the ovs driver."""
        mid = f"b{RUN}{len(self.made)}"
        labels = {LABEL_IP: ip, LABEL_PREFIX: "24", LABEL_VLAN: str(VLAN),
                  LABEL_GATEWAY: f"{NET}.1"}  # fmt: skip
        c = self.clients[host].containers.run(IMAGE, ["sleep", "infinity"], detach=True,
                                              name=f"dvb{mid}", network_mode="none",
                                              labels=labels, init=True)  # fmt: skip
        self.made.append((host, mid, c))
        c.reload()
        info = ContainerInfo(id=c.id, name=c.name, machine_id=mid, labels=labels, state="running",
                             started_at=None, pid=c.attrs["State"]["Pid"], cpus=1.0, memory=0,
                             image=IMAGE, network="none")  # fmt: skip
        asyncio.run(OvsNetwork(f"dvh-{host}").plumb(info))
        return c

    def close(self) -> None:
        """Remove the containers and their ports."""
        for host, mid, c in self.made:
            c.remove(force=True)
            asyncio.run(OvsNetwork(f"dvh-{host}").release(mid, VLAN))
        for client in self.clients.values():
            client.close()


def fabric_run(client: object, server: object, server_ip: str):
    """A runner of PROG's clients from ``client`` to ``server``."""
    server.exec_run(["python3", "-c", PROG, "serve"], detach=True)

    def run(mode: str, arg: str) -> dict:
        res = client.exec_run(["python3", "-c", PROG, mode, server_ip, arg])
        return json.loads(res.output.decode().strip().splitlines()[-1])

    return run


def veth_setup() -> subprocess.Popen:
    """Two namespaces dvhbA, dvhbB on one veth; the server runs in dvhbB."""
    for ns in ("dvhbA", "dvhbB"):
        sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", "dvhbva", "netns", "dvhbA", "type", "veth", "peer", "name", "dvhbvb",
       "netns", "dvhbB")  # fmt: skip
    for ns, dev, ip in (("dvhbA", "dvhbva", "10.231.69.201"), ("dvhbB", "dvhbvb", "10.231.69.202")):
        sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    return subprocess.Popen(["ip", "netns", "exec", "dvhbB", sys.executable, "-c", PROG, "serve"])


def veth_run(mode: str, arg: str) -> dict:
    """PROG's client ``mode`` in dvhbA towards dvhbB."""
    out = sh("ip", "netns", "exec", "dvhbA", sys.executable, "-c", PROG, mode, "10.231.69.202", arg)
    return json.loads(out.strip().splitlines()[-1])


def veth_teardown(server: subprocess.Popen | None) -> None:
    """Stop the server and remove both namespaces (the veth goes with them)."""
    if server:
        server.kill()
        server.wait()
    for ns in ("dvhbA", "dvhbB"):
        sh("ip", "netns", "del", ns, check=False)


def failover(run, seconds: float = 3.0) -> dict:
    """One failover of h1's bond under a 1 ms UDP probe; its loss and recovery time."""
    active = re.search(r"member (\S+): enabled\n\s+active member",
                       sh("ovs-appctl", "bond/show", "dvh1bond")).group(1)  # fmt: skip
    box: dict = {}
    probe = threading.Thread(target=lambda: box.update(run("probe", str(seconds))))
    probe.start()
    try:
        # The probe is under way (exec start takes well under this) when the link goes down.
        time.sleep(seconds / 3)
        sh("ip", "link", "set", active, "down")
        probe.join()
    finally:
        sh("ip", "link", "set", active, "up")
    return box


def report(name: str, tcp: list[float], rtts: list[float]) -> None:
    """One line of results."""
    rtts = sorted(rtts)
    p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))]
    print(
        f"{name:7} TCP {median(tcp):8.0f} Mbit/s (median of {len(tcp)})   "
        f"UDP RTT p50 {median(rtts):6.0f} us  p99 {p99:6.0f} us  ({len(rtts)} round trips)"
    )


def main() -> None:
    """Measure both paths and the failovers; print one line each."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rtts", type=int, default=500)
    ap.add_argument("--failovers", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ours = not all((HOSTS_RUN / h / "docker.sock").exists() for h in ("h1", "h2"))
    env = {**os.environ, "DOCKVM_HOSTS": "2", "DOCKVM_HOSTS_AGENTS": "0"}
    if ours:  # no multi-host stack: two hosts of its own, without agents, removed after
        subprocess.run([str(HOSTS_SH), "up"], env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"fabric vs veth — {machine()}")
    sh(str(HOSTS_SH), "vlan", "add", str(VLAN), f"{NET}.1/24")
    ms, server = Machines(), None
    try:
        a = ms.start("h1", f"{NET}.11")
        b = ms.start("h2", f"{NET}.12")
        run = fabric_run(a, b, f"{NET}.12")
        server = veth_setup()
        for name, fn in (("fabric", run), ("veth", veth_run)):
            fn("rtt", "20")  # warm-up: ARP, the servers up
            tcp = [fn("tcp", str(args.seconds))["mbit_s"] for _ in range(args.repeats)]
            report(name, tcp, fn("rtt", str(args.rtts))["rtts_us"])
        fails = [failover(run) for _ in range(args.failovers)]
        gaps = [f["max_gap_ms"] for f in fails]
        lost = [f["sent"] - f["received"] for f in fails]
        print(
            f"failover: recovery (longest reply gap) median {median(gaps):.1f} ms "
            f"(all: {', '.join(f'{g:.1f}' for g in gaps)}); probes lost median {median(lost)} "
            f"of ~{fails[0]['sent']} sent every 1 ms"
        )
    finally:
        veth_teardown(server)
        ms.close()
        sh(str(HOSTS_SH), "vlan", "del", str(VLAN), check=False)
        if ours:
            subprocess.run([str(HOSTS_SH), "down"], env=env, check=False, capture_output=True)


if __name__ == "__main__":
    main()
