"""``dockvm machine migrate`` and ``dockvm host evacuate`` with a fake transport."""

from __future__ import annotations

from tests.unit.test_cli import _run, fake

__all__ = ["fake"]  # the fixture, imported for pytest

ACCEPTED = {"id": "m-1", "action": "migrate", "state": "migrating", "source": "h1",
            "target": "h2", "host": "h1", "links": {}}  # fmt: skip


def _machine(mid: str, host: str, state: str, reason: str | None = None) -> dict:
    return {"id": mid, "app": "web", "state": state, "host": host, "reason": reason,
            "pending": None, "ip": "10.0.0.5", "cpus": 1, "memory": 1 << 20, "disk": 1 << 30,
            "hostname": "web-1",
            "transitions": [{"state": "migrating", "reason": "exported from h1 (512 MiB disk)"},
                            {"state": state, "reason": reason}]}  # fmt: skip


def test_migrate_posts_the_target_follows_the_machine_and_says_where_it_went(fake):
    fake.answers[("POST", "/v1/machines/m-1/migrate")] = (202, ACCEPTED)
    fake.answers[("GET", "/v1/machines/m-1")] = (200, _machine("m-1", "h2", "running"))

    res = _run("machine", "migrate", "m-1", "--to", "h2")

    assert res.exit_code == 0, res.output
    assert "m-1: moved h1 → h2, running" in res.output
    assert fake.requests[0][:3] == ("POST", "/v1/machines/m-1/migrate", {"host": "h2"})


def test_a_migration_that_went_back_exits_1_with_its_reason(fake):
    fake.answers[("POST", "/v1/machines/m-1/migrate")] = (202, ACCEPTED)
    back = _machine("m-1", "h1", "running", "import_failed on h2: image_not_found")
    fake.answers[("GET", "/v1/machines/m-1")] = (200, back)

    res = _run("machine", "migrate", "m-1")

    assert res.exit_code == 1
    assert "stayed on h1, running: import_failed on h2: image_not_found" in res.output
    assert fake.requests[0][2] == {}  # no --to: placement chooses


def test_evacuate_refuses_a_host_that_is_not_drained(fake):
    fake.answers[("GET", "/v1/hosts/h1")] = (200, {"id": "h1", "drained": False})

    res = _run("host", "evacuate", "h1")

    assert res.exit_code == 1
    assert "dockvm host drain h1" in res.output
    assert [r[:2] for r in fake.requests] == [("GET", "/v1/hosts/h1")]


def test_evacuate_migrates_each_movable_machine_and_skips_the_others(fake):
    fake.answers[("GET", "/v1/hosts/h1")] = (200, {"id": "h1", "drained": True})
    fake.answers[("GET", "/v1/machines")] = (
        200,
        {
            "items": [_machine("m-1", "h1", "running"), _machine("m-2", "h1", "failed")],
            "next": None,
        },
    )
    fake.answers[("POST", "/v1/machines/m-1/migrate")] = (202, ACCEPTED)
    fake.answers[("GET", "/v1/machines/m-1")] = (200, _machine("m-1", "h2", "running"))

    res = _run("host", "evacuate", "h1")

    assert res.exit_code == 1  # m-2 stayed
    assert "m-1: moved h1 → h2" in res.output and "m-2: skipped (failed)" in res.output
    assert "h1: 1 of 2 machines moved" in res.output
    assert ("POST", "/v1/machines/m-2/migrate") not in [r[:2] for r in fake.requests]
