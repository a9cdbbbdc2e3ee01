"""``dockvm alert list`` with a fake transport."""

from __future__ import annotations

from tests.unit.test_cli import _run, fake

__all__ = ["fake"]  # the fixture, imported for pytest

ENTRY = {"at": "2026-11-29T12:00:00Z", "who": "alertmanager", "role": "monitoring",
         "method": "POST", "path": "/v1/prometheus/alerts", "status": 200, "target": "m-1",
         "event": "alert.firing",
         "detail": {"alert": "MachineOomKilled", "labels": {"machine_id": "m-1"},
                    "summary": "the OOM killer killed in machine m-1"}}  # fmt: skip


def test_alert_list_reads_the_alertmanager_entries_of_the_audit_log(fake):
    fake.answers[("GET", "/v1/audit")] = (200, {"items": [ENTRY]})

    res = _run("alert", "list")

    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "m-1" in line)
    assert "firing" in row and "MachineOomKilled" in row
    assert fake.requests[0][3] == {"who": "alertmanager", "limit": "50"}
