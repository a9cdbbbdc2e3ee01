"""Which health check a release runs: a declared one by name, or an inline port probe."""

from __future__ import annotations

import pytest

from libs.common.contracts.releases import HealthCheck, ReleaseRequested
from libs.common.errors import ValidationFailed
from services.gateway.fakes import MemoryAppChecks
from services.gateway.service.checks import UndeclaredCommand, resolve_check

SMOKE = {"type": "cmd", "target": "/usr/local/bin/smoke", "timeout_s": 20.0}


def _req(**over: object) -> ReleaseRequested:
    fields = {"release_id": "r1", "app": "web", "group_id": "g", "artifact_id": "a",
              "version": "1.0", "batch_size": 1, **over}
    return ReleaseRequested(**fields)


@pytest.fixture
async def checks() -> MemoryAppChecks:
    c = MemoryAppChecks()
    await c.declare("web", "smoke", SMOKE, by="ops")
    return c


async def test_a_named_check_becomes_the_declared_one(checks):
    req = await resolve_check(_req(check="smoke"), checks)

    assert (req.check, req.health_check) == ("smoke", HealthCheck(**SMOKE))


async def test_a_name_overrides_an_inline_check_sent_beside_it(checks):
    sneaky = HealthCheck(type="cmd", target="rm -rf /")

    req = await resolve_check(_req(check="smoke", health_check=sneaky), checks)

    assert req.health_check == HealthCheck(**SMOKE)


async def test_an_inline_port_probe_is_kept(checks):
    probe = HealthCheck(type="tcp", target="8000")

    assert (await resolve_check(_req(health_check=probe), checks)).health_check == probe


@pytest.mark.parametrize(
    ("req", "error", "reason"),
    [
        (_req(health_check=HealthCheck(type="cmd", target="id")), UndeclaredCommand,
         "undeclared_check"),
        (_req(check="nope"), ValidationFailed, "unknown_check"),
        (_req(app="api", check="smoke"), ValidationFailed, "unknown_check"),
    ],
    ids=["inline-cmd", "unknown-name", "another-apps-check"],
)
async def test_an_undeclared_command_or_name_is_refused(checks, req, error, reason):
    with pytest.raises(error) as caught:
        await resolve_check(req, checks)

    assert caught.value.reason == reason


def test_a_release_gives_some_check():
    with pytest.raises(ValueError, match="give check"):
        _req()
