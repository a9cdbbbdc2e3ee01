"""The Prometheus side that ships in the repo: the alert rules and the rendered configs pass
Prometheus's and Alertmanager's own checkers (``promtool``, ``amtool``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.prometheus import TEMPLATES, render


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_alert_rules_pass_promtool():
    out = _run("promtool", "check", "rules", *map(str, (TEMPLATES / "rules").glob("*.yml")))
    assert "SUCCESS: 7 rules found" in out


@pytest.mark.parametrize(
    "alert",
    [
        "MachineDown",
        "MachineRestartLoop",
        "MachineOomKilled",
        "MachineCpuThrottled",
        "MachineDataDiskNearlyFull",
        "HostAgentSilent",
        "ImageSyncFailing",
    ],
)
def test_every_alert_of_the_issue_is_a_rule(alert: str):
    text = "".join(p.read_text() for p in (TEMPLATES / "rules").glob("*.yml"))
    assert f"- alert: {alert}\n" in text


def test_rendered_prometheus_config_passes_promtool(tmp_path: Path):
    secret = tmp_path / "gateway.secret"
    secret.write_text("s3cret")
    conf = tmp_path / "prometheus.yml"
    conf.write_text(
        render(
            "prometheus.yml.in",
            SCRAPE_INTERVAL="10s",
            SD_REFRESH="10s",
            INSTANCE="t",
            RULES_DIR=str(TEMPLATES / "rules"),
            ALERTMANAGER="127.0.0.1:9093",
            GATEWAY_URL="http://127.0.0.1:8080",
            SECRET_FILE=str(secret),
        )
    )
    out = _run("promtool", "check", "config", str(conf))
    assert "SUCCESS" in out


def test_rendered_alertmanager_config_passes_amtool(tmp_path: Path):
    conf = tmp_path / "alertmanager.yml"
    conf.write_text(
        render(
            "alertmanager.yml.in",
            WEBHOOK_URL="http://127.0.0.1:8080/v1/prometheus/alerts",
            SECRET_FILE=str(tmp_path / "gateway.secret"),
        )
    )
    out = _run("amtool", "check-config", str(conf))
    assert "SUCCESS" in out
