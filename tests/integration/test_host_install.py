"""scripts/host-install.sh into a staging root (--root): the agents' code out of the dockvm
image, the units, a 0600 env file an operator's edits survive; the installed units verify
against the installed venv. Nothing is started here: test_host_units_systemd.py runs the units
under a systemd container standing in for a host."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support.services import ROOT

UNITS = ("dockvm-provisioner.service", "dockvm-monitor.service")


def _install(root: Path, *args: str) -> str:
    out = subprocess.run(
        [str(ROOT / "scripts/host-install.sh"), "--root", str(root), "--no-start", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def image() -> str:
    """dockvm/dockvm:<version>, built (or found in the layer cache) by scripts/image.sh."""
    out = subprocess.run(
        [str(ROOT / "scripts/image.sh"), "build"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_host_install_stages_code_units_and_settings(image: str, tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    _install(root, "--image", image, "--host-id", "stage1")
    env = root / "etc/dockvm/dockvm.env"
    env.write_text(env.read_text().replace("DOCKVM_MONGO_DB=dockvm", "DOCKVM_MONGO_DB=edited"))
    second = _install(root, "--image", image)
    venv = root / "opt/dockvm/venv/bin/python"
    imported = subprocess.run(
        [str(venv), "-c", "import services.provisioner.app, services.monitor.app"],
        env={**os.environ, "PYTHONPATH": str(root / "opt/dockvm/src")},
        cwd="/",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    pth = next((root / "opt/dockvm/venv/lib").glob("python3*/site-packages/dockvm-src.pth"))

    # The operator's env file is kept on a second run, 0600; the units are the repository's.
    assert "keeping" in second
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert "DOCKVM_HOST_ID=stage1" in env.read_text()
    assert "DOCKVM_MONGO_DB=edited" in env.read_text()
    for name in UNITS:
        installed = root / "etc/systemd/system" / name
        assert installed.read_text() == (ROOT / "deploy/systemd" / name).read_text()
        assert stat.S_IMODE(installed.stat().st_mode) == 0o644
    # The agents' code runs from the installed venv (the .pth names the final path).
    assert imported.returncode == 0, imported.stderr
    assert pth.read_text().strip() == "/opt/dockvm/src"
    assert not (root / "opt/dockvm.new").exists() and not (root / "opt/dockvm.old").exists()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_installed_units_verify_against_the_installed_venv(image: str, tmp_path: Path):
    root = tmp_path / "root"
    root.mkdir()
    _install(root, "--image", image, "--host-id", "stage2")
    for name in UNITS:
        unit = root / "etc/systemd/system" / name
        local = tmp_path / name
        local.write_text(unit.read_text().replace("/opt/dockvm", str(root / "opt/dockvm")))
        out = subprocess.run(
            ["systemd-analyze", "verify", str(local)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert (out.returncode, out.stderr) == (0, ""), name
