"""The dockvm CLI with a fake transport: config resolution, tables, --json, errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cli.main as main
from cli.client import format_problem
from cli.config import DEFAULT_URL, resolve

MACHINE = {
    "id": "m-1", "type": "docker", "app": "web", "state": "running", "reason": None,
    "image": "img", "cpus": 1.0, "memory": 512 << 20, "disk": 1 << 30, "dc": "dc1",
    "vlan_id": 233, "hostname": "web-1", "ip": "10.233.1.10", "host": "h1", "pending": None,
    "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
    "transitions": [{"state": "requested", "at": "2026-01-01T00:00:00Z", "reason": None}],
    "links": {},
}


class FakeTransport:
    """Answers from a table of (method, path) → (status, body); records the requests."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, Any]]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, str, Any, dict | None]] = []

    async def __aenter__(self) -> FakeTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def request(self, method, path, *, json=None, params=None, headers=None):
        self.requests.append((method, path, json, params))
        return self.answers[(method, path)]


@pytest.fixture
def fake(monkeypatch) -> FakeTransport:
    t = FakeTransport({})
    monkeypatch.setattr(main, "make_transport", lambda config: t)
    monkeypatch.setenv("DOCKVM_TOKEN", "t")
    return t


def _run(*args: str):
    return CliRunner().invoke(main.app, list(args))


def test_create_posts_the_spec_waits_and_prints_a_table(fake):
    fake.answers[("POST", "/v1/machines")] = (202, {"machines": [{"id": "m-1"}]})
    fake.answers[("GET", "/v1/machines")] = (200, {"items": [MACHINE], "next": None})
    res = _run("machine", "create", "--app", "web", "--image", "img", "--cpus", "1",
               "--memory", "512m", "--disk", "1g", "--dc", "dc1", "--vlan", "233", "--count", "1")

    assert res.exit_code == 0, res.output
    assert fake.requests[0][2] == {
        "type": "docker", "app": "web", "image": "img", "cpus": 1.0, "memory": "512m",
        "disk": "1g", "dc": "dc1", "vlan_id": 233, "count": 1, "ssh_keys": []}
    assert fake.requests[1][3]["ids"] == "m-1"
    assert "10.233.1.10" in res.output


def test_list_json_is_machine_readable(fake):
    fake.answers[("GET", "/v1/machines")] = (200, {"items": [MACHINE], "next": None})
    res = _run("machine", "list", "--app", "web", "--json")

    assert json.loads(res.output)[0]["id"] == "m-1"
    assert fake.requests[0][3]["app"] == "web"


def test_a_problem_prints_each_failing_field_and_exits_1(fake):
    problem = {"title": "Unprocessable Content", "status": 422, "detail": "x",
               "errors": [{"field": "cpus", "message": "too big"},
                          {"field": "image", "message": "bad"}]}
    fake.answers[("PATCH", "/v1/machines/m-1")] = (422, problem)
    res = _run("machine", "resize", "m-1", "--cpus", "99")

    assert res.exit_code == 1
    assert "cpus: too big" in res.output
    assert "image: bad" in res.output


def test_scale_and_delete_hit_their_routes(fake):
    fake.answers[("POST", "/v1/apps/web/scale")] = (200, {"created": [], "destroying": ["m-2"]})
    fake.answers[("DELETE", "/v1/machines/m-1")] = (202, {"id": "m-1", "state": "destroyed"})

    assert _run("app", "scale", "web", "1").exit_code == 0
    assert _run("machine", "delete", "m-1").exit_code == 0
    assert [(m, p) for m, p, _, _ in fake.requests] == [
        ("POST", "/v1/apps/web/scale"), ("DELETE", "/v1/machines/m-1")]


def test_a_scale_in_that_could_not_remove_a_machine_names_it_and_exits_1(fake):
    fake.answers[("POST", "/v1/apps/web/scale")] = (200, {
        "created": [], "destroying": ["m-2"],
        "failed": [{"id": "m-3", "reason": "conflict", "detail": "a resize is in flight"}]})

    result = _run("app", "scale", "web", "1")

    assert result.exit_code == 1
    assert "m-3: conflict (a resize is in flight)" in result.output


def test_config_order_option_env_file_default(tmp_path: Path):
    cfg = tmp_path / ".config" / "dockvm"
    cfg.mkdir(parents=True)
    (cfg / "config.toml").write_text('url = "http://gw:9000"\ntoken = "from-file"\n')
    state = tmp_path / "state"
    state.mkdir()
    (state / "admin.token").write_text("from-state\n")
    env = {"DOCKVM_STATE_DIR": str(state)}

    assert resolve(env, tmp_path, token="opt").token == "opt"
    assert resolve({**env, "DOCKVM_TOKEN": "env"}, tmp_path).token == "env"
    assert (resolve(env, tmp_path).url, resolve(env, tmp_path).token) == (
        "http://gw:9000", "from-file")
    assert (resolve(env, tmp_path / "nohome").url, resolve(env, tmp_path / "nohome").token) == (
        DEFAULT_URL, "from-state")


def test_format_problem_without_fields_shows_the_detail():
    assert format_problem(409, {"title": "Conflict", "detail": "busy"}) == "Conflict (409): busy"


def test_host_show_lists_quarantined_machines_and_purge_hits_its_route(fake):
    host = {"id": "h1", "dc": "dc1", "status": "online", "last_seen": "2026-01-01T00:00:00Z",
            "capacity": {"cpus": 8, "memory": 1, "disk": 1}, "allocated": {"cpus": 1, "memory": 1,
            "disk": 1}, "machines": 2, "labels": {}, "version": "1",
            "quarantined": [{"machine_id": "m-9", "was_running": True,
                             "quarantined_at": "2026-01-01T00:00:00Z",
                             "purge_after": "2026-01-08T00:00:00Z"}],
            "alerts": [{"reason": "orphan_sweep_capped", "detail": "9 due", "count": 9,
                        "at": "2026-01-01T00:00:00Z"}]}  # fmt: skip
    fake.answers[("GET", "/v1/hosts/h1")] = (200, host)
    fake.answers[("POST", "/v1/hosts/h1/orphans/m-9/purge")] = (
        200, {"host": "h1", "machine_id": "m-9", "status": "purged"})  # fmt: skip

    shown = _run("host", "show", "h1")
    purged = _run("host", "purge", "h1", "m-9")

    assert shown.exit_code == 0 and "m-9" in shown.output and "orphan_sweep_capped" in shown.output
    assert purged.exit_code == 0 and "m-9 purged from h1" in purged.output
    assert fake.requests[-1][:2] == ("POST", "/v1/hosts/h1/orphans/m-9/purge")
