"""deploy/systemd/: the host agents' units pass `systemd-analyze verify` and keep what the
agents need (docker first, restart on failure, the env file) and no option that would hide the
provisioner's mounts from dockerd.

systemd does not run this machine (PID 1 is not systemd), so `systemd-analyze verify` (offline:
it parses the unit, resolves its dependencies and checks that ExecStart is executable) and
`systemd-analyze security --offline` stand in for a started unit. ExecStart and
WorkingDirectory point at /opt/dockvm, which only host-install.sh makes, so the copies verified
here point at this repository's venv instead.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
NAMES = ("dockvm-provisioner.service", "dockvm-monitor.service")
# Each gives the unit a mount namespace of its own (systemd.exec(5)), where the XFS volumes the
# provisioner mounts would never reach the host's dockerd.
MOUNT_NAMESPACING = (
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "ReadWritePaths",
    "ReadOnlyPaths",
    "InaccessiblePaths",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "PrivateMounts",
    "TemporaryFileSystem",
    "BindPaths",
    "MountFlags",
    "ProtectProc",
    "PrivateNetwork",
)

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package systemd)",
)


def _parse(name: str) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNITS / name)
    return cp


def _local_copy(name: str, tmp_path: Path, text: str | None = None) -> Path:
    """The unit with /opt/dockvm replaced by this repository and its venv."""
    text = (
        (text or (UNITS / name).read_text())
        .replace("/opt/dockvm/venv/bin/python", sys.executable)
        .replace("/opt/dockvm/src", str(ROOT))
    )
    out = tmp_path / name
    out.write_text(text)
    return out


def _verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "verify", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_analyze
@pytest.mark.parametrize("name", NAMES)
def test_unit_passes_systemd_analyze_verify(name: str, tmp_path: Path):
    out = _verify(_local_copy(name, tmp_path))

    # verify exits 0 on unknown keys or bad values too, and says so on stderr: both count.
    assert (out.returncode, out.stderr) == (0, "")


@needs_analyze
def test_verify_does_catch_a_broken_unit(tmp_path: Path):
    text = (UNITS / NAMES[0]).read_text().replace("Restart=on-failure", "Restart=sometimes")
    out = _verify(_local_copy(NAMES[0], tmp_path, text))

    assert "restart specifier" in out.stderr


@pytest.mark.parametrize("name", NAMES)
def test_unit_runs_its_agent_after_docker_and_restarts_it(name: str):
    unit = _parse(name)
    agent = name.removeprefix("dockvm-").removesuffix(".service")

    assert "docker.service" in unit["Unit"]["After"].split()
    assert unit["Service"]["Restart"] == "on-failure"
    assert unit["Service"]["EnvironmentFile"] == "/etc/dockvm/dockvm.env"
    assert unit["Service"]["ExecStart"].endswith(f"-m services.{agent}")
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_provisioner_has_no_mount_namespace_and_keeps_root():
    service = _parse(NAMES[0])["Service"]

    assert [k for k in MOUNT_NAMESPACING if k in service] == []
    assert "User" not in service and "CapabilityBoundingSet" not in service
    assert service["NoNewPrivileges"] == "yes"
    assert "AF_NETLINK" in service["RestrictAddressFamilies"].split()


@needs_analyze
def test_monitor_is_sandboxed_more_than_the_provisioner(tmp_path: Path):
    def exposure(name: str) -> float:
        out = subprocess.run(
            [
                "systemd-analyze",
                "security",
                "--offline=yes",
                "--no-pager",
                str(_local_copy(name, tmp_path)),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        line = next(ln for ln in out.stdout.splitlines() if "Overall exposure level" in ln)
        return float(line.split(":")[1].split()[0])

    provisioner, monitor = exposure(NAMES[0]), exposure(NAMES[1])

    assert monitor < 4.0 < provisioner
