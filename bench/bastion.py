"""The bastion's cost: bulk throughput and the interactive round trip, through it vs direct SSH.

Starts a machine (a base-image container whose sshd trusts the bastion's CA and, for the peer,
also the benchmark's key), a bastion process on a fresh vhost and database, then measures in the
same run, on the same machine, with the same clients:

- **throughput**: OpenSSH's ``ssh`` running ``cat`` of a file of ``--mb`` MB of text (base64 of
  random bytes: the bastion records output, and text is what ``cat`` shows people) into
  /dev/null, through the bastion (``ssh -p PORT bench@127.0.0.1 root@IP cat F``) and straight to
  the machine; median MB/s of ``--rounds`` rounds, and the ratio;
- **latency**: one byte written to ``cat`` on the machine (asyncssh, exec, no PTY) until it
  comes back, ``--echoes`` times, through the bastion and direct; p50 and p99, and what the
  bastion adds.

Everything it made is removed at the end (also on error).

    .venv/bin/python -m bench.bastion [--mb 200] [--rounds 3] [--echoes 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import asyncssh

from bench._common import machine, median, percentile
from libs.common.bus import RpcClient, connect
from libs.common.contracts.bastion import GrantAdd, UserAdd
from libs.common.db import mongo_client
from services.bastion.keys import load_keys
from tests.integration.test_bastion_support import Box, summary
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

KEY = asyncssh.generate_private_key("ssh-ed25519")
FILE = "/tmp/bench.txt"


def _ssh_argv(key: Path, port: int, user_host: str) -> list[str]:
    return [
        "ssh", "-i", str(key), "-p", str(port), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "LogLevel=ERROR", user_host,
    ]  # fmt: skip


async def _cat(argv: list[str]) -> float:
    """Seconds ``argv`` takes to print the file into /dev/null."""
    start = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[-3:]} failed: {err.decode()[-300:]}")
    return time.perf_counter() - start


async def _echoes(conn: asyncssh.SSHClientConnection, command: str, n: int) -> list[float]:
    """Round trips of one byte through ``cat``, in milliseconds."""
    proc = await conn.create_process(command, encoding=None)
    times = []
    for i in range(n + 20):
        start = time.perf_counter()
        proc.stdin.write(b"x")
        got = await proc.stdout.readexactly(1)
        assert got == b"x"
        if i >= 20:  # the first ones warm up both paths
            times.append((time.perf_counter() - start) * 1000)
    proc.stdin.write_eof()
    await proc.wait_closed()
    return times


def _cpu_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def _measure(
    args: argparse.Namespace, box: Box, port: int, tmp: Path, bastion_pid: int
) -> None:
    key = tmp / "key"
    key.write_bytes(KEY.export_private_key())
    key.chmod(0o600)
    via = [*_ssh_argv(key, port, "bench@127.0.0.1"), f"root@{box.ip}", "cat", FILE]
    direct = [*_ssh_argv(key, 22, f"root@{box.ip}"), "cat", FILE]
    await _cat([*direct[:-2], f"base64 -w 76 /dev/urandom | head -c {args.mb}M > {FILE}"])
    through, straight, user, system = [], [], 0.0, 0.0
    for _ in range(args.rounds):
        before = _cpu_s(bastion_pid)
        through.append(args.mb / await _cat(via))
        after = _cpu_s(bastion_pid)
        user, system = user + after[0] - before[0], system + after[1] - before[1]
        straight.append(args.mb / await _cat(direct))
    print(f"throughput, cat of {args.mb} MB (median of {args.rounds}):")
    for name, rates in (("through the bastion", through), ("direct SSH", straight)):
        print(f"  {name:<19} {median(rates):7.1f} MB/s  runs {[round(x) for x in rates]}")
    print(f"  ratio               {median(through) / median(straight):7.2f}x  (target >= 0.5x)")
    per = (user + system) / (args.mb * args.rounds)
    split = f"{user / (user + system):.0%} user"
    print(f"  bastion CPU         {per * 1000:7.2f} ms per MB ({split}; {1 / per:.0f} MB/s a core)")
    opts = {"known_hosts": None, "agent_path": None, "client_keys": [KEY]}
    async with (
        await asyncssh.connect("127.0.0.1", port, username="bench", **opts) as b,
        await asyncssh.connect(box.ip, username="root", **opts) as d,
    ):
        lat_b = await _echoes(b, f"root@{box.ip} cat", args.echoes)
        lat_d = await _echoes(d, "cat", args.echoes)
    print(f"interactive round trip of one byte ({args.echoes} echoes), ms:")
    for name, lat in (("through the bastion", lat_b), ("direct SSH", lat_d)):
        print(f"  {name:<19} p50 {percentile(lat, 50):6.3f}  p99 {percentile(lat, 99):6.3f}")
    added50 = percentile(lat_b, 50) - percentile(lat_d, 50)
    added99 = percentile(lat_b, 99) - percentile(lat_d, 99)
    print(f"  added               p50 {added50:6.3f}  p99 {added99:6.3f}  (target p50 <= 2 ms)")


async def main(args: argparse.Namespace) -> None:
    """Set up, measure, clean up."""
    import docker

    from tests.integration.test_bastion_support import (
        IMAGE,
        SSH_CAPS,
        _port_open,
        _tar,
        read_host_keys,
    )

    print(machine())
    tmp = Path(tempfile.mkdtemp(prefix="bench-bastion-"))
    state = tmp / "state"
    keys = load_keys(state)
    vhost = await create_vhost()
    db_name = f"bench_{uuid.uuid4().hex[:10]}"
    client = docker.DockerClient(base_url="unix:///var/run/docker.sock")
    run = uuid.uuid4().hex[:8]
    net = f"benchbastion-{run}"
    client.api.create_network(net, driver="bridge")
    cid = client.api.create_container(
        IMAGE, name=net, hostname="bench-1",
        environment={"DOCKVM_AUTHORIZED_KEYS": KEY.export_public_key().decode().strip()},
        host_config=client.api.create_host_config(
            network_mode=net, cap_drop=["ALL"], cap_add=SSH_CAPS
        ),
    )["Id"]  # fmt: skip
    mongo = mongo_client(MONGO_URL, app_name="bench-bastion")
    svc = None
    try:
        client.api.put_archive(cid, "/etc/ssh", _tar({
            "dockvm_user_ca.pub": (keys.ca_public_line() + "\n").encode(),
            "sshd_config.d/00-bastion-ca.conf": b"TrustedUserCAKeys /etc/ssh/dockvm_user_ca.pub\n",
        }))  # fmt: skip
        client.api.start(cid)
        ip = client.api.inspect_container(cid)["NetworkSettings"]["Networks"][net]["IPAddress"]
        while not _port_open(ip, 22):
            await asyncio.sleep(0.1)
        box = Box(cid, net, ip, f"m-bench{run}", hostname="bench-1", app="bench",
                  host_keys=read_host_keys(client, cid))  # fmt: skip
        await summary(mongo[db_name], box)
        port = free_port()
        env = {"DOCKVM_AMQP_URL": vhost.url, "DOCKVM_MONGO_URL": MONGO_URL,
               "DOCKVM_MONGO_DB": db_name, "DOCKVM_STATE_DIR": str(state),
               "DOCKVM_BASTION_SSH_PORT": str(port), "DOCKVM_LOG_LEVEL": "warning"}  # fmt: skip
        svc = await ServiceProcess("bastion", env, free_port(), log_path=tmp / "b.log").start()
        conn = await connect(vhost.url, name="bench-bastion")
        rpc = RpcClient(conn, source="bench")
        await rpc.request(UserAdd(name="bench", ssh_keys=[KEY.export_public_key().decode()]))
        await rpc.request(GrantAdd(user="bench", app="bench", ttl_s=3600))
        await rpc.close()
        await conn.close()
        assert svc.proc is not None
        await _measure(args, box, port, tmp, svc.proc.pid)
    finally:
        if svc is not None:
            await svc.stop()
        client.api.remove_container(cid, force=True)
        client.api.remove_network(net)
        await mongo.drop_database(db_name)
        await mongo.close()
        await delete_vhost(vhost)
        shutil.rmtree(tmp, ignore_errors=True)  # its casts are as big as what cat printed


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the file cat prints")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--echoes", type=int, default=1000)
    asyncio.run(main(parser.parse_args()))
