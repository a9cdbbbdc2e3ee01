"""deploy/image/healthcheck.py: which port the image's HEALTHCHECK probes for a service."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def healthcheck():
    """The script as a module (it is not in a package: the image runs it by path)."""
    spec = importlib.util.spec_from_file_location(
        "healthcheck", ROOT / "deploy/image/healthcheck.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "port"),
    [("gateway", 8080), ("imagesync", 8081), ("ipam", 9102), ("bastion", 9105), ("builder", 9106)],
)
def test_default_port_comes_from_the_settings_class(healthcheck, monkeypatch, name, port):
    monkeypatch.delenv(f"DOCKVM_{name.upper()}_PORT", raising=False)

    assert healthcheck.port_of(name, []) == port


def test_port_argument_wins_over_the_environment(healthcheck, monkeypatch):
    monkeypatch.setenv("DOCKVM_IPAM_PORT", "19102")

    assert healthcheck.port_of("ipam", ["--port", "7000"]) == 7000
    assert healthcheck.port_of("ipam", ["--port=7001"]) == 7001
    assert healthcheck.port_of("ipam", ["--host-id", "x"]) == 19102
