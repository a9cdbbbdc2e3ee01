"""``dockvm image``: a YAML spec is posted as JSON, the streamed log advances the steps and is
printed, a failed build exits 1 with its reason; the listing shows each dc's digest."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import cli.main as main

pytestmark = pytest.mark.unit

BUILD = {"id": "b-123456", "name": "team/web", "tag": "1", "policy_version": 2, "state": "queued"}


class _Streaming:
    """A transport whose answers come from a table and whose log streams ``lines``."""

    def __init__(self, final: dict[str, Any], lines: list[str]) -> None:
        self.answers = {("POST", "/v1/images/builds"): (202, BUILD),
                        ("GET", "/v1/images/builds/b-123456"): (200, final)}  # fmt: skip
        self.lines = lines
        self.requests: list[tuple[str, str, Any]] = []

    async def __aenter__(self) -> _Streaming:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def request(self, method, path, *, json=None, params=None, headers=None):  # type: ignore[no-untyped-def]
        self.requests.append((method, path, json))
        return self.answers[(method, path)]

    async def stream(self, path: str) -> AsyncIterator[str]:
        self.requests.append(("STREAM", path, None))
        for line in self.lines:
            yield line


def _run(monkeypatch, transport: Any, *args: str):
    monkeypatch.setattr(main, "make_transport", lambda config: transport)
    monkeypatch.setenv("DOCKVM_TOKEN", "t")
    return CliRunner().invoke(main.app, list(args), env={"COLUMNS": "200"})


def _spec(tmp_path: Path) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text("name: team/web\ntag: '1'\nbase: debian-bookworm\npackages: [jq]\n"
                    "env: {A: b}\n")  # fmt: skip
    return path


def test_a_build_posts_the_yaml_as_json_and_prints_the_streamed_log(monkeypatch, tmp_path):
    final = {**BUILD, "state": "succeeded", "image": "reg/team/web:1", "digest": "sha256:ab",
             "layers": 3, "size": 200 << 20}  # fmt: skip
    t = _Streaming(final, ["==> build\n", "Step 1/3 : FROM dockvm/base:bookworm\n", "==> done\n"])

    res = _run(monkeypatch, t, "image", "build", "-f", str(_spec(tmp_path)))

    assert res.exit_code == 0, res.output
    assert t.requests[0][2] == {"name": "team/web", "tag": "1", "base": "debian-bookworm",
                                "packages": ["jq"], "env": {"A": "b"}}  # fmt: skip
    assert ("STREAM", "/v1/images/builds/b-123456/log", None) in t.requests
    assert "Step 1/3 : FROM dockvm/base:bookworm" in res.output
    assert "pushed reg/team/web:1@sha256:ab" in res.output


def test_a_failed_build_exits_1_with_its_reason(monkeypatch, tmp_path):
    final = {**BUILD, "state": "failed", "reason": "build_failed", "detail": "apt: exit 100"}
    t = _Streaming(final, ["E: Unable to locate package jq\n"])

    res = _run(monkeypatch, t, "image", "build", "-f", str(_spec(tmp_path)))

    assert res.exit_code == 1
    assert "Unable to locate package" in res.output and "failed (build_failed)" in res.output


def test_a_spec_file_that_is_not_a_mapping_is_refused(monkeypatch, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")

    res = _run(monkeypatch, _Streaming({}, []), "image", "build", "-f", str(bad))

    assert res.exit_code == 2 and "must hold a mapping" in res.output


def test_the_listing_shows_who_built_each_tag_and_each_dcs_digest(monkeypatch):
    item = {"name": "team/web", "tag": "1", "build_id": "b-123456", "built_by": "ann",
            "spec_digest": "sha256:" + "c" * 64, "policy_version": 2, "built_at": None,
            "digests": {"dc1": "sha256:" + "d" * 64, "dc2": None}}  # fmt: skip
    t = _Streaming({}, [])
    t.answers[("GET", "/v1/images")] = (200, [item])

    res = _run(monkeypatch, t, "image", "list")

    assert res.exit_code == 0, res.output
    assert "team/web:1" in res.output and "ann" in res.output and "v2" in res.output
    assert "sha256:ddddddddddd" in res.output
