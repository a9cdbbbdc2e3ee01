"""The shell scripts a release runs in a machine quote the version and the release id.

The contracts already refuse such values (tests/unit/test_contracts.py); these scripts must not
depend on that: each hostile value has to stay one word, read literally by ``sh``.
"""

from __future__ import annotations

import shlex

import pytest

from services.provisioner.deploy import install_script, stage_script, switch_script

HOSTILE = ["1.0;rm -rf /", "../../etc", ".hidden", "$(reboot)", "`id`", "a b", "x'; touch /p; '"]


@pytest.mark.parametrize("version", HOSTILE)
def test_stage_script_keeps_the_version_one_word(version):
    new = f"/app/releases/{version}.new"

    assert shlex.split(stage_script(version)) == ["rm", "-rf", new, "&&", "mkdir", "-p", new]


@pytest.mark.parametrize("version", HOSTILE)
def test_switch_script_keeps_the_version_one_word(version):
    words = shlex.split(switch_script(version))

    assert words == [
        "ln", "-sfn", f"/app/releases/{version}", "/app/current.next",
        "&&", "mv", "-T", "/app/current.next", "/app/current",
    ]  # fmt: skip


@pytest.mark.parametrize("value", HOSTILE)
def test_install_script_keeps_version_and_release_id_one_word_each(value):
    target = f"/app/releases/{value}"

    words = shlex.split(install_script(value, value))

    assert words == [
        "printf", "%s\\n", value, ">", f"{target}.new/.dockvm-release",
        "&&", "rm", "-rf", target, "&&", "mv", f"{target}.new", target,
    ]  # fmt: skip


def test_plain_values_are_left_unquoted():
    assert switch_script("2.1.0-SNAPSHOT") == (
        "ln -sfn /app/releases/2.1.0-SNAPSHOT /app/current.next"
        " && mv -T /app/current.next /app/current"
    )
