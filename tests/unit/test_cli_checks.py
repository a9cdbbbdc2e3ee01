"""Health check options of ``dockvm release create`` and ``dockvm app check set``, with a fake
transport."""

from __future__ import annotations

from tests.unit.test_cli import _run, fake

__all__ = ["fake"]  # the fixture, imported for pytest

COORDS = ("--group", "com.example", "--artifact", "war-app", "--version", "1.0.0")


def test_release_create_sends_the_inline_checks_fail_after(fake):
    fake.answers[("POST", "/v1/releases")] = (202, {"id": "r-1", "status": "running"})

    res = _run("release", "create", "web", *COORDS, "--check", "http:8080/", "--check-timeout",
               "120", "--check-fail-after", "3", "--no-wait", "--json")

    assert res.exit_code == 0, res.output
    assert fake.requests[0][2]["health_check"] == {
        "type": "http", "target": "8080/", "timeout_s": 120, "fail_after": 3}


def test_check_set_sends_fail_after_and_leaves_it_unset_by_default(fake):
    fake.answers[("PUT", "/v1/apps/web/checks/up")] = (
        200, {"name": "up", "type": "tcp", "target": "22", "timeout_s": 30})

    with_it = _run("app", "check", "set", "web", "up", "--type", "tcp", "--target", "22",
                   "--fail-after", "5")
    without = _run("app", "check", "set", "web", "up", "--type", "tcp", "--target", "22")

    assert (with_it.exit_code, without.exit_code) == (0, 0), with_it.output + without.output
    assert fake.requests[0][2]["fail_after"] == 5
    assert fake.requests[1][2]["fail_after"] is None


def test_release_create_sends_reload_when_asked(fake):
    fake.answers[("POST", "/v1/releases")] = (202, {"id": "r-1", "status": "running"})

    res = _run("release", "create", "web", *COORDS, "--packaging", "war", "--check",
               "http:8080/", "--activate", "reload", "--no-wait", "--json")

    assert res.exit_code == 0, res.output
    assert (fake.requests[0][2]["activate"], fake.requests[0][2]["packaging"]) == (
        "reload", "war")
