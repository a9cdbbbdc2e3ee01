"""Every service starts against the real stack, reports ready, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp
import pytest

from tests.support.services import ROOT

SERVICES = [
    ("gateway", []),
    ("ipam", []),
    ("imagesync", []),
    ("provisioner", ["--host-id", "runner-test"]),
    ("monitor", ["--host-id", "runner-test"]),
]


@pytest.mark.parametrize(("name", "args"), SERVICES, ids=[s[0] for s in SERVICES])
async def test_service_starts_ready_and_stops_on_sigterm(start_service, name, args):
    svc = await start_service(name, *args)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{svc.url}/readyz") as r:
            ready = await r.json()
        async with s.get(f"{svc.url}/healthz") as r:
            health = r.status
        async with s.get(f"{svc.url}/metrics") as r:
            metrics = await r.text()

    code = await svc.stop()

    assert ready["status"] == "ok"
    assert ready["checks"]["bus"] == ready["checks"]["database"] == "ok"
    assert health == 200
    assert "python_info" in metrics
    assert code == 0
    assert "service stopped" in svc.log_tail()


async def _run(env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.ipam",
        *args,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, (out + err).decode()


async def test_dead_rabbitmq_gives_one_clear_line(service_env):
    env = {**service_env, "DOCKVM_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/"}

    code, output = await _run(env)

    assert code == 1
    assert output.strip().splitlines() == [
        line for line in output.strip().splitlines() if "RabbitMQ is not reachable" in line
    ]
    assert "make run" in output
    assert "Traceback" not in output


async def test_bad_setting_fails_at_start_naming_the_variable(service_env):
    code, output = await _run({**service_env, "DOCKVM_DELIVERY_LIMIT": "many"})

    assert code == 2
    assert "invalid setting DOCKVM_DELIVERY_LIMIT" in output
    assert "Traceback" not in output
