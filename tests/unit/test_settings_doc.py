"""docs/configuration.md is what the settings classes say."""

from __future__ import annotations

from pathlib import Path

from libs.common.settings_doc import SERVICES, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_configuration_reference_is_up_to_date():
    assert DOC.read_text() == render(), (
        "docs/configuration.md is out of date: "
        "run .venv/bin/python -m libs.common.settings_doc > docs/configuration.md"
    )


def test_every_service_and_a_known_setting_are_documented():
    text = render()

    assert [f"## {name}" in text for name, _ in SERVICES] == [True] * len(SERVICES)
    assert "| `DOCKVM_CONTAINER_STEP_TIMEOUT_S` | float (gt 0) | `120.0` |" in text
    assert "| `DOCKVM_AMQP_URL` |" in text
