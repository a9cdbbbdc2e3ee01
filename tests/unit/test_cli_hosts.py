"""``dockvm host list|drain|undrain`` with a fake transport."""

from __future__ import annotations

from tests.unit.test_cli import _run, fake

__all__ = ["fake"]  # the fixture, imported for pytest

HOST = {"id": "h1", "dc": "dc1", "status": "drained", "last_seen": "2026-01-01T00:00:00Z",
        "capacity": {"cpus": 8, "memory": 1 << 30, "disk": 1 << 30},
        "allocated": {"cpus": 1, "memory": 1 << 20, "disk": 1 << 20}, "machines": 2,
        "labels": {}, "version": "1", "drained": True,
        "images": ["127.0.0.1:5001/team/web:1", "dockvm/base:bookworm"]}  # fmt: skip


def test_host_list_shows_state_and_how_many_images(fake):
    fake.answers[("GET", "/v1/hosts")] = (200, {"items": [HOST]})

    res = _run("host", "list")

    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "h1" in line)
    assert "drained" in row and " 2 " in row


def test_drain_and_undrain_post_to_their_routes_and_say_what_changed(fake):
    fake.answers[("POST", "/v1/hosts/h1/drain")] = (
        200, {"host": "h1", "drained": True, "changed": True})  # fmt: skip
    fake.answers[("POST", "/v1/hosts/h1/undrain")] = (
        200, {"host": "h1", "drained": False, "changed": False})  # fmt: skip

    drained = _run("host", "drain", "h1")
    undrained = _run("host", "undrain", "h1")

    assert drained.exit_code == 0 and "h1 drained" in drained.output
    assert undrained.exit_code == 0 and "h1 undrained (already)" in undrained.output
    assert [r[:2] for r in fake.requests] == [
        ("POST", "/v1/hosts/h1/drain"), ("POST", "/v1/hosts/h1/undrain")]
