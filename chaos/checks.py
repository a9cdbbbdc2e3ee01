"""What must hold after a fault, read from the sources of truth themselves: the gateway's
machines, ipam's leases (both straight from the run's database) and the Docker engine.

Each check returns a list of failures, one line each; an empty list is a pass.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import docker

from libs.common.db import mongo_client, read_all
from tests.support.stack import MONGO_URL

# A machine in one of these states has (or is getting) a container and an IP.
LIVE = {"requested", "ip_assigned", "placed", "creating", "running", "stopped", "resizing"}


@dataclass(frozen=True)
class Container:
    """One of the run's containers, as the engine lists it."""

    id: str
    machine_id: str
    state: str
    ip: str | None
    started_at: str | None = None


def containers(prefix: str) -> dict[str, Container]:
    """The run's containers (on a ``prefix`` network), by machine id."""
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock", timeout=60)
    try:
        # The low-level list: the high-level one inspects each container in a second call.
        listed = client.api.containers(all=True, filters={"label": "dockvm.machine_id"})
    finally:
        client.close()
    out: dict[str, Container] = {}
    for c in listed:
        nets = (c.get("NetworkSettings") or {}).get("Networks") or {}
        if any(n.startswith(prefix) for n in nets):
            mid = c["Labels"]["dockvm.machine_id"]
            out[mid] = Container(c["Id"], mid, c["State"], c["Labels"].get("dockvm.ip"))
    return out


async def _documents(db_name: str) -> tuple[list[dict], list[dict]]:
    """Every machine (without its history) and every lease of the run."""
    client = mongo_client(MONGO_URL, "dockvm-chaos")
    try:
        db = client[db_name]
        machines = await read_all(db["machines"].find({}, {"transitions": 0}))
        leases = await read_all(db["leases"].find({}))
    finally:
        await client.close()
    return machines, leases


async def audit(db_name: str, prefix: str) -> list[str]:
    """No orphan or missing container, no leaked or duplicate IP, over the whole run."""
    machines, leases = await _documents(db_name)
    found = await asyncio.to_thread(containers, prefix)
    live = {m["_id"]: m for m in machines if m["state"] in LIVE}
    failures = [
        f"orphan container {c.id[:12]} of {mid}" for mid, c in found.items() if mid not in live
    ]
    failures += [
        f"{mid} is {m['state']} without a container"
        for mid, m in live.items()
        if m["state"] in ("running", "stopped") and mid not in found
    ]
    active = [le for le in leases if le["state"] == "active"]
    failures += [
        f"leaked IP {le['ip']} (lease of {le['_id']}, a machine not live)"
        for le in active
        if le["_id"] not in live
    ]
    by_machine = {le["_id"]: le["ip"] for le in active}
    failures += [
        f"{mid} has IP {m['ip']} but its lease says {by_machine.get(mid)}"
        for mid, m in live.items()
        if m.get("ip") and by_machine.get(mid) != m["ip"]
    ]
    failures += [
        f"{mid}: container IP {c.ip} differs from the machine's {live[mid].get('ip')}"
        for mid, c in found.items()
        if mid in live and c.ip and live[mid].get("ip") and c.ip != live[mid]["ip"]
    ]
    ips = Counter(m["ip"] for m in live.values() if m.get("ip"))
    ips.update(le["ip"] for le in active if le["_id"] not in live)
    failures += [f"duplicate IP {ip} ({n} holders)" for ip, n in ips.items() if n > 1]
    return failures


async def doubled(db_name: str, ids: list[str]) -> list[str]:
    """Effects applied twice: a machine with two history records (two IP claims) or two
    ``running`` (or ``destroyed``) transitions in one life."""
    client = mongo_client(MONGO_URL, "dockvm-chaos")
    try:
        db = client[db_name]
        machines = await read_all(db["machines"].find({"_id": {"$in": ids}}))
        history = await read_all(db["ip_history"].find({}))
    finally:
        await client.close()
    claims = Counter(h["machine_id"] for h in history if h["machine_id"] in set(ids))
    out = [f"{mid}: {n} IP claims" for mid, n in claims.items() if n > 1]
    for m in machines:
        states = Counter(t["state"] for t in m["transitions"])
        out += [f"{m['_id']}: {n}x {s}" for s, n in states.items() if s in _ONCE and n > 1]
    return out


_ONCE = ("ip_assigned", "placed", "destroyed")


def host_traces(state: Path, ids: list[str]) -> list[str]:
    """What a destroyed machine must not leave on the host: a loop device, mount or disk file."""
    loops = subprocess.run(
        ["losetup", "-a", "-O", "NAME,BACK-FILE", "-n"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    volumes = state / "volumes"
    files = [p for p in volumes.rglob("m-*")] if volumes.exists() else []
    out: list[str] = []
    for mid in ids:
        out += [f"{mid}: loop device left: {ln.split()[0]}" for ln in loops if mid in ln]
        out += [f"{mid}: mount left: {ln.split()[1]}" for ln in mounts if mid in ln.split()[1]]
        out += [f"{mid}: disk file left: {p.name}" for p in files if p.name.startswith(mid)]
    return out
