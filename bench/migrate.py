"""Benchmark: cold migration of a machine with a 1 GB data disk holding 500 MB, against a plain
``cp --sparse=always`` of the same volume file, in the same run.

The stack is real: ipam, the gateway and two provisioner agents on hosts h1 and h2 of the
local datacenter (their own engines and OVS bridges, VLAN 3167, 10.231.67.0/24), on a vhost and
database of the run. One machine (0.25 CPU, 256 MiB, ``--disk`` 1g) is made on h1 and
``--fill`` MiB of random data (500) written to /data. Then, ``--rounds`` times, it migrates to
the other host (``POST /v1/machines/{id}/migrate?wait=``, timed from the request to the 200:
stop, export, the disk's stream between the agents, import, start, the source's cleanup), and
the volume file it now has is copied with ``cp --sparse=always`` to a file beside it (timed,
then removed). Both read a file that was just written (page cache warm on both sides); the
first migration warms nothing the later ones need. Prints each migration's steps (from the
machine's transitions), the medians and their ratio.

Uses hosts h1 and h2 of a running multi-host stack, else brings up two of its own (without
agents) and takes them down after; it removes what it made.
Usage: ``.venv/bin/python -m bench.migrate [--rounds 3] [--disk 1g] [--fill 500]``
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import docker

from bench._common import machine, median
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

HOSTS_RUN = Path("/run/dockvm/hosts")
HOSTS_SH = Path(__file__).resolve().parents[1] / "scripts" / "hosts.sh"
IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")
VLAN, NET = 3167, "10.231.67"
RUN = uuid.uuid4().hex[:6]
ENGINES = {f"bm{RUN}-1": "h1", f"bm{RUN}-2": "h2"}


def _agent_env(engine: str, state: Path) -> dict[str, str]:
    return {
        "DOCKVM_DOCKER_URL": f"unix://{HOSTS_RUN / engine / 'docker.sock'}",
        "DOCKVM_NETWORK_DRIVER": "ovs", "DOCKVM_OVS_BRIDGE": f"dvh-{engine}",
        "DOCKVM_OVS_UPLINK": f"dvh{engine[1:]}bond", "DOCKVM_OVS_ROUTER": "dvh-tor",
        "DOCKVM_STATE_DIR": str(state), "DOCKVM_HEARTBEAT_INTERVAL_S": "1",
        "DOCKVM_STOP_TIMEOUT_S": "5", "DOCKVM_NETWORK_PREFIX": f"dvbm{RUN}",
    }  # fmt: skip


class Stack:
    """ipam, two agents and the gateway of this run, and an admin client of the gateway."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[ServiceProcess] = []
        self.api: aiohttp.ClientSession | None = None
        self.vhost: Any = None

    async def start(self) -> aiohttp.ClientSession:
        """Start everything; the gateway's admin client."""
        self.vhost = await create_vhost()
        common = {"DOCKVM_AMQP_URL": self.vhost.url, "DOCKVM_MONGO_URL": MONGO_URL,
                  "DOCKVM_MONGO_DB": f"bench_mig_{RUN}", "DOCKVM_STATE_DIR": str(self.root),
                  "DOCKVM_LOG_LEVEL": "warning"}  # fmt: skip
        starts = [("ipam", [], {})]
        starts += [("provisioner", ["--host-id", h], _agent_env(e, self.root / e))
                   for h, e in ENGINES.items()]  # fmt: skip
        starts += [("gateway", [], {"DOCKVM_HOST_CHECK_S": "0.5"})]
        for name, args, env in starts:
            proc = ServiceProcess(name, {**common, **env}, free_port(), args,
                                  log_path=self.root / f"{name}-{len(self.procs)}.log")  # fmt: skip
            self.procs.append(proc)
            await proc.start()
        token = (self.root / "admin.token").read_text().strip()
        self.api = aiohttp.ClientSession(
            self.procs[-1].url, headers={"Authorization": f"Bearer {token}"}
        )
        return self.api

    async def close(self) -> None:
        """Stop everything and drop the vhost."""
        if self.api is not None:
            await self.api.close()
        for proc in reversed(self.procs):
            if proc.proc is not None and proc.proc.returncode is None:
                await proc.stop()
        if self.vhost is not None:
            await delete_vhost(self.vhost)


async def _json(resp: aiohttp.ClientResponse, *ok: int) -> Any:
    body = await resp.json()
    if resp.status not in ok:
        raise SystemExit(f"{resp.method} {resp.url.path}: {resp.status} {body}")
    return body


async def _online(api: aiohttp.ClientSession) -> None:
    async with asyncio.timeout(60):
        while True:
            async with api.get("/v1/hosts") as r:
                seen = {h["id"]: h["status"] for h in (await r.json())["items"]}
            if all(seen.get(h) == "online" for h in ENGINES):
                return
            await asyncio.sleep(0.2)


def _fill(engine: str, mid: str, mib: int) -> None:
    client = docker.DockerClient(base_url=f"unix://{HOSTS_RUN / engine / 'docker.sock'}")
    try:
        res = client.containers.get(f"dockvm-{mid}").exec_run(
            ["sh", "-c", f"head -c {mib}M /dev/urandom >/data/fill && sync"]
        )
    finally:
        client.close()
    if res.exit_code != 0:
        raise SystemExit(f"filling /data failed: {res.output!r}")


def _cp(img: Path) -> float:
    copy = img.with_name(f"{img.stem}.bench-copy")
    t0 = time.perf_counter()
    subprocess.run(["cp", "--sparse=always", str(img), str(copy)], check=True)
    os.sync()  # as the migration's copy is fsynced
    took = time.perf_counter() - t0
    copy.unlink()
    return took


def _steps(m: dict[str, Any], since: datetime) -> str:
    """How long each step of the last migration took, from its transitions."""
    marks = [(t["at"], (t["reason"] or t["state"]).split(" ")[0]) for t in m["transitions"]]
    marks = [(datetime.fromisoformat(a), r) for a, r in marks if datetime.fromisoformat(a) >= since]
    out = []
    for (a, what), (b, _) in itertools.pairwise(marks):
        out.append(f"{what} {(b - a).total_seconds():.2f}s")
    return ", ".join(out)


async def run(args: argparse.Namespace, root: Path) -> None:
    """Make the machine, migrate it ``rounds`` times, copy its file after each; print."""
    stack = Stack(root)
    api = await stack.start()
    mid = None
    try:
        await _online(api)
        pool = {"name": f"bm{RUN}", "dc": "dc1", "vlan_id": VLAN, "cidr": f"{NET}.0/24",
                "gateway": f"{NET}.1", "cooldown_s": 0}  # fmt: skip
        await _json(await api.post("/v1/pools", json=pool), 201)
        h1 = next(h for h, e in ENGINES.items() if e == "h1")
        h2 = next(h for h, e in ENGINES.items() if e == "h2")
        await _json(await api.post(f"/v1/hosts/{h2}/drain"), 200)
        spec = {"app": "bench-mig", "image": IMAGE, "cpus": 0.25, "memory": "256m",
                "disk": args.disk, "dc": "dc1", "vlan_id": VLAN, "count": 1}  # fmt: skip
        made = await _json(await api.post("/v1/machines?wait=180", json=spec), 202)
        mid = made["machines"][0]["id"]
        await _json(await api.post(f"/v1/hosts/{h2}/undrain"), 200)
        await asyncio.to_thread(_fill, "h1", mid, args.fill)
        migrations, copies, here = [], [], h1
        for _ in range(args.rounds):
            there = h2 if here == h1 else h1
            since = datetime.now().astimezone()
            t0 = time.perf_counter()
            resp = await api.post(f"/v1/machines/{mid}/migrate?wait=600", json={"host": there})
            moved = await _json(resp, 200)
            migrations.append(time.perf_counter() - t0)
            m = await _json(await api.get(f"/v1/machines/{mid}"), 200)
            img = root / ENGINES[there] / "volumes" / f"{mid}.img"
            copies.append(await asyncio.to_thread(_cp, img))
            used = img.stat().st_blocks * 512 >> 20
            print(f"  {here} → {there}: {migrations[-1]:.2f} s ({moved['state']}; "
                  f"{_steps(m, since)}); cp --sparse=always of its {used} MiB file "
                  f"{copies[-1]:.2f} s")  # fmt: skip
            here = there
        mig, cp = median(migrations), median(copies)
        print(f"migration median {mig:.2f} s, cp --sparse=always median {cp:.2f} s, "
              f"ratio {mig / cp:.2f}x ({args.rounds} rounds, disk {args.disk}, "
              f"{args.fill} MiB of data)")  # fmt: skip
    finally:
        if mid is not None:  # its agent removes its container, disk and port
            await api.delete(f"/v1/machines/{mid}?wait=60")
        await stack.close()


def main() -> None:
    """Bring up what is missing, run, remove what was made."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--disk", default="1g")
    ap.add_argument("--fill", type=int, default=500, help="MiB of random data in /data")
    args = ap.parse_args()
    ours = not all((HOSTS_RUN / h / "docker.sock").exists() for h in ("h1", "h2"))
    env = {**os.environ, "DOCKVM_HOSTS": "2", "DOCKVM_HOSTS_AGENTS": "0"}
    if ours:
        subprocess.run([str(HOSTS_SH), "up"], env=env, check=True, stdout=subprocess.DEVNULL)
    root = Path(tempfile.mkdtemp(prefix="dockvm-bench-mig-"))
    os.chmod(root, 0o700)
    print(f"migration vs cp --sparse=always — {machine()}")
    try:
        asyncio.run(run(args, root))
    finally:
        subprocess.run([str(HOSTS_SH), "vlan", "del", str(VLAN)], capture_output=True,
                       check=False)  # fmt: skip
        if ours:
            subprocess.run([str(HOSTS_SH), "down"], env=env, check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
