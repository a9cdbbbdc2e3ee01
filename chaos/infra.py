"""A RabbitMQ node and a FerretDB of the chaos suite's own, so its restarts disturb nothing else.

The RabbitMQ and FerretDB restart scenarios used to restart the shared broker and database,
which broke every other test run and a running ``make run`` on the machine. By default the
suite now starts a second RabbitMQ node and a second FerretDB on other loopback ports
(``scripts/stack.sh infra-up`` with the settings below), runs every scenario on them, and
stops them at the end. Only dockerd is still the shared one (its restart scenario stops every
container on the engine); ``--shared-infra`` runs on the shared broker and database as before.

:func:`enter` must run before ``tests.support.stack`` is imported: the test support reads its
addresses from the environment once, at import.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The private pair's settings, as scripts/stack.sh reads them.
PRIVATE = {
    "DOCKVM_RABBITMQ_NODENAME": "dockvm-chaos",
    "DOCKVM_RABBITMQ_PORT": "5682",
    "DOCKVM_RABBITMQ_MGMT_PORT": "15682",
    "DOCKVM_FERRETDB_PORT": "27027",
    "DOCKVM_FERRETDB_DEBUG_ADDR": "127.0.0.1:8098",
    "DOCKVM_STATE_DIR": "/var/lib/dockvm-chaos",
}


def stack_env() -> dict[str, str]:
    """The environment of ``scripts/stack.sh infra-up|infra-down`` for the private pair."""
    env = {k: v for k, v in os.environ.items() if k != "DOCKVM_MONGO_URL"}
    return env | PRIVATE


def _stack(command: str) -> None:
    subprocess.run(
        [str(ROOT / "scripts" / "stack.sh"), command], env=stack_env(), check=True, timeout=300
    )


def enter() -> None:
    """Start the private RabbitMQ and FerretDB (a no-op when they answer) and point this
    process (the suite, its services, its faults) at them."""
    _stack("infra-up")
    host = "127.0.0.1"
    os.environ.update(
        {
            "DOCKVM_TEST_AMQP_HOST": host,
            "DOCKVM_TEST_AMQP_PORT": PRIVATE["DOCKVM_RABBITMQ_PORT"],
            "DOCKVM_TEST_RABBIT_API": f"http://{host}:{PRIVATE['DOCKVM_RABBITMQ_MGMT_PORT']}/api",
            "DOCKVM_MONGO_URL": f"mongodb://{host}:{PRIVATE['DOCKVM_FERRETDB_PORT']}/",
            "DOCKVM_RABBITMQ_NODENAME": PRIVATE["DOCKVM_RABBITMQ_NODENAME"],
            # Read by chaos.faults: where the private FerretDB's pid file is, how to restart it.
            "DOCKVM_CHAOS_INFRA_STATE": PRIVATE["DOCKVM_STATE_DIR"],
        }
    )


def leave() -> None:
    """Stop the private RabbitMQ and FerretDB (their data stays for the next run)."""
    _stack("infra-down")


def clean() -> None:
    """Stop the private pair if it runs and remove its state (``make clean``)."""
    import shutil

    _stack("infra-down")
    shutil.rmtree(PRIVATE["DOCKVM_STATE_DIR"], ignore_errors=True)
