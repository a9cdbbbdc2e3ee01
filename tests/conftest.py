"""Fixtures in layers: settings → stack (vhost, database) → service → client.

Tests under ``tests/unit`` are marked ``unit`` and must not do I/O; tests under
``tests/integration`` are marked ``integration`` and use the real local stack, each with its own
uuid vhost and database so they never see each other.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection

from libs.common.bus import AmqpPublisher, connect
from libs.common.db import mongo_client
from tests.support.probe import BusProbe
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, Vhost, create_vhost, delete_vhost, free_port


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by its tier, from its directory."""
    for item in items:
        path = str(item.fspath)
        if "/tests/unit/" in path:
            item.add_marker(pytest.mark.unit)
        elif "/tests/integration/" in path:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
async def vhost() -> AsyncIterator[Vhost]:
    """A fresh RabbitMQ vhost, deleted after the test."""
    v = await create_vhost()
    yield v
    await delete_vhost(v)


@pytest.fixture
def db_name() -> str:
    """A fresh database name."""
    return f"test_{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def mongo_db(db_name: str):
    """An ``AsyncDatabase`` on the real MongoDB API, dropped after the test."""
    client = mongo_client(MONGO_URL, app_name="dockvm-tests")
    yield client[db_name]
    await client.drop_database(db_name)
    await client.close()


@pytest.fixture
async def amqp(vhost: Vhost) -> AsyncIterator[AbstractRobustConnection]:
    """A robust connection to the test's vhost."""
    conn = await connect(vhost.url, name="dockvm-tests")
    yield conn
    await conn.close()


@pytest.fixture
async def publisher(amqp: AbstractRobustConnection) -> AsyncIterator[AmqpPublisher]:
    """A confirming publisher on the test's vhost."""
    pub = AmqpPublisher(amqp, source="tests")
    yield pub
    await pub.close()


@pytest.fixture
async def probe_factory(
    amqp: AbstractRobustConnection,
) -> AsyncIterator[Callable[..., BusProbe]]:
    """Make bus probes bound to routing patterns; started ones are closed after the test."""
    probes: list[BusProbe] = []

    async def make(*bindings: str) -> BusProbe:
        p = await BusProbe(amqp, list(bindings)).start()
        probes.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in probes:
        await p.close()


@pytest.fixture
def service_env(vhost: Vhost, db_name: str, mongo_db, tmp_path: Path) -> dict[str, str]:
    """Environment for a service subprocess bound to this test's vhost, database and state.

    It depends on ``mongo_db`` so that the database is dropped only after every service of the
    test has stopped: dropping a database under a live writer can crash FerretDB's SQLite.
    """
    return {
        "DOCKVM_AMQP_URL": vhost.url,
        "DOCKVM_MONGO_URL": MONGO_URL,
        "DOCKVM_MONGO_DB": db_name,
        "DOCKVM_STATE_DIR": str(tmp_path / "state"),
        "DOCKVM_WEBHOOK_SECRET": "test-webhook-secret",
    }


@pytest.fixture
async def start_service(
    service_env: dict[str, str], tmp_path: Path
) -> AsyncIterator[Callable[..., ServiceProcess]]:
    """Start ``python -m services.<name>`` processes; all are stopped after the test."""
    started: list[ServiceProcess] = []

    async def start(
        name: str, *args: str, env: dict[str, str] | None = None, port: int | None = None
    ) -> ServiceProcess:
        svc = ServiceProcess(
            name,
            {**service_env, **(env or {})},
            port or free_port(),
            list(args),
            log_path=tmp_path / f"{name}-{len(started)}.log",
        )
        started.append(svc)
        return await svc.start()

    yield start  # type: ignore[misc]
    for svc in started:
        if svc.proc is not None and svc.proc.returncode is None:
            try:
                await svc.stop()
            except TimeoutError:
                svc.kill()
