"""The host agents' units under a real systemd: a systemd container stands in for a Docker host.

scripts/host-install.sh stages the code (out of the dockvm image), the units and the env file
into a directory; a container of the systemd flavour, on the host's network and with the
engine's socket, gets them where the script puts them on a host, and its systemd starts the
units as a host's would. It is set up as the provisioner sets up a systemd machine (its own
name=systemd cgroup directory, a private cgroup namespace, tmpfs /run) plus SYS_ADMIN, which a
host's systemd holds (the units' ProtectHostname= needs a namespace). This machine's bounding set
has no SYS_RESOURCE, so `--privileged` cannot start here, and the units' OOMScoreAdjust=-500 is
not applied (systemd ignores the EPERM, "assuming containerized execution"). Its own sshd,
cron and node exporter are masked on systemd's command line: they would listen on this
machine's ports.

What must hold: both units become active, the provisioner answers /readyz and heartbeats on the
bus under its host id, a SIGKILL is followed by systemd's restart (Restart=on-failure), and a
`systemctl stop` ends it cleanly (SIGTERM, the agent drains) within TimeoutStopSec.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import docker
import pytest

from libs.common.bus import connect
from services.provisioner.domain import SYSTEMD_CAPABILITIES, SYSTEMD_CGROUP
from tests.integration.test_host_install import _install, image  # noqa: F401 - fixture
from tests.support.probe import BusProbe
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

SYSTEMD_IMAGE = "dockvm/base-systemd:bookworm"
UNITS = ("dockvm-provisioner.service", "dockvm-monitor.service")
MASKED = ("ssh.service", "ssh.socket", "cron.service", "prometheus-node-exporter.service",
          "dockvm-ssh-setup.service", "dockvm-app.service")  # fmt: skip


def _exec(c, *cmd: str) -> tuple[int, str]:
    res = c.exec_run(list(cmd))
    return res.exit_code, res.output.decode(errors="replace").strip()


async def _until(c, *cmd: str, want: str, timeout: float = 90) -> str:
    """Run ``cmd`` in ``c`` until its output is ``want``; the last output."""
    out = ""
    try:
        async with asyncio.timeout(timeout):
            while (out := (await asyncio.to_thread(_exec, c, *cmd))[1]) != want:
                await asyncio.sleep(0.5)
    except TimeoutError:
        pass
    return out


@pytest.fixture
async def host(image: str, tmp_path: Path) -> AsyncIterator[tuple]:  # noqa: F811
    """A systemd "host" with the agents installed by host-install.sh (not started yet)."""
    vhost = await create_vhost()
    host_id = f"unit-{uuid.uuid4().hex[:8]}"
    ports = {"provisioner": free_port(), "monitor": free_port()}
    root = tmp_path / "root"
    root.mkdir()
    _install(root, "--image", image, "--host-id", host_id)
    env = root / "etc/dockvm/dockvm.env"
    env.write_text(
        env.read_text()
        .replace("amqp://guest:guest@127.0.0.1:5672/", vhost.url)
        .replace("mongodb://127.0.0.1:27017/", MONGO_URL)
        .replace("DOCKVM_MONGO_DB=dockvm", f"DOCKVM_MONGO_DB=test_{uuid.uuid4().hex[:12]}")
        .replace("DOCKVM_PROVISIONER_PORT=9103", f"DOCKVM_PROVISIONER_PORT={ports['provisioner']}")
        .replace("DOCKVM_MONITOR_PORT=9104", f"DOCKVM_MONITOR_PORT={ports['monitor']}")
    )
    volumes = {
        "/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
        str(root / "opt/dockvm"): {"bind": "/opt/dockvm", "mode": "ro"},
        str(root / "etc/dockvm"): {"bind": "/etc/dockvm", "mode": "ro"},
        **{
            str(root / "etc/systemd/system" / u): {"bind": f"/etc/systemd/system/{u}", "mode": "ro"}
            for u in UNITS
        },
    }
    name = f"dockvm-test-{host_id}"
    cgroup = Path(SYSTEMD_CGROUP) / "dockvm" / name
    if Path(SYSTEMD_CGROUP).is_dir():  # cgroup v1: systemd's own hierarchy, writable
        cgroup.mkdir(parents=True, exist_ok=True)
        volumes[str(cgroup)] = {"bind": SYSTEMD_CGROUP, "mode": "rw"}
    client = docker.from_env()
    c = await asyncio.to_thread(
        client.containers.run, SYSTEMD_IMAGE, [f"systemd.mask={u}" for u in MASKED],
        detach=True, name=name, network_mode="host", cgroupns="private",
        cap_drop=["ALL"], cap_add=[*SYSTEMD_CAPABILITIES, "SYS_ADMIN"],
        tmpfs={"/run": "", "/run/lock": ""}, volumes=volumes,
        environment={"container": "docker"}, labels={"dockvm.test": "host-units"},
        stop_signal="SIGINT",
    )  # fmt: skip
    conn = await connect(vhost.url, name="dockvm-tests")
    probe = await BusProbe(conn, ["host.heartbeat"]).start()
    try:
        await _until(c, "systemctl", "is-system-running", want="running", timeout=90)
        yield c, host_id, ports, probe
    finally:
        await probe.close()
        await conn.close()
        await asyncio.to_thread(c.remove, force=True)
        client.close()
        for d in sorted(cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                d.rmdir()
        if cgroup.is_dir():
            cgroup.rmdir()
        await delete_vhost(vhost)


async def _ready(port: int, timeout: float = 60) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                            if r.status == 200:
                                return r.status
                    except (aiohttp.ClientError, TimeoutError):
                        pass
                    await asyncio.sleep(0.5)
        except TimeoutError:
            return 0


@pytest.mark.timeout(600)
async def test_the_agents_run_restart_and_stop_under_systemd(host):
    c, host_id, ports, probe = host

    code, out = await asyncio.to_thread(_exec, c, "systemctl", "enable", "--now", *UNITS)
    assert code == 0, out
    active = [await _until(c, "systemctl", "is-active", u, want="active") for u in UNITS]
    ready = await _ready(ports["provisioner"])
    beat = await probe.wait_for("host.heartbeat", lambda m: m.host_id == host_id, timeout=60)
    pid = (await asyncio.to_thread(_exec, c, "systemctl", "show", "-p", "MainPID", "--value",
                                   UNITS[0]))[1]  # fmt: skip

    # Killed: systemd starts it again (Restart=on-failure, RestartSec=5s).
    await asyncio.to_thread(_exec, c, "systemctl", "kill", "-s", "KILL", UNITS[0])
    restarts = await _until(c, "systemctl", "show", "-p", "NRestarts", "--value", UNITS[0],
                            want="1")  # fmt: skip
    again = await _until(c, "systemctl", "is-active", UNITS[0], want="active")
    new_pid = (await asyncio.to_thread(_exec, c, "systemctl", "show", "-p", "MainPID",
                                       "--value", UNITS[0]))[1]  # fmt: skip
    ready_again = await _ready(ports["provisioner"])

    # Stopped: SIGTERM, the agent drains and exits 0, well within TimeoutStopSec=60.
    code, out = await asyncio.to_thread(_exec, c, "systemctl", "stop", UNITS[0])
    result = (await asyncio.to_thread(_exec, c, "systemctl", "show", "-p", "Result", "--value",
                                      UNITS[0]))[1]  # fmt: skip
    state = (await asyncio.to_thread(_exec, c, "systemctl", "is-active", UNITS[0]))[1]

    assert active == ["active", "active"]
    assert ready == 200
    assert beat[0].dc == "dc1"
    assert pid not in ("", "0")
    assert (restarts, again, ready_again) == ("1", "active", 200)
    assert new_pid not in ("", "0", pid)
    assert code == 0, out
    assert (state, result) == ("inactive", "success")
