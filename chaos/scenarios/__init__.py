"""The scenarios of the chaos suite, one table: name, rounds by default (the issue's), what must
hold, whether it disturbs the shared stack, and why it cannot run here (if so)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from chaos.report import Round
from chaos.scenarios import cluster, images, infra, kills
from chaos.scenarios.common import Params
from chaos.stack import ChaosStack

__all__ = ["SCENARIOS", "Params", "Scenario"]

RunRound = Callable[[ChaosStack, Params, int], Awaitable[Round]]


@dataclass(frozen=True)
class Scenario:
    """One row of the table."""

    name: str
    rounds: int
    holds: str
    run: RunRound
    # Restarts RabbitMQ, FerretDB or dockerd, which every other user of this machine shares.
    disruptive: bool = False
    unsupported: Callable[[], str] = lambda: ""


def _kill(service: str) -> Scenario:
    return Scenario(
        f"kill-{service}",
        10,
        f"kill -9 of {service} during a create of N machines: every machine running; "
        "0 orphan containers, 0 leaked or duplicate IPs",
        partial(kills.kill_during_create, service=service),
    )


SCENARIOS: list[Scenario] = [
    *(_kill(s) for s in ("gateway", "ipam", "provisioner", "imagesync", "monitor")),
    Scenario(
        "kill-provisioner-destroy",
        10,
        "kill -9 of the provisioner mid-destroy: destroyed; no container, disk, loop, mount or "
        "lease left",
        kills.kill_during_destroy,
    ),
    Scenario(
        "kill-provisioner-resize",
        10,
        "kill -9 of the provisioner mid-resize: resized (API and container limits), running",
        kills.kill_during_resize,
    ),
    Scenario(
        "rabbitmq-restart",
        5,
        "RabbitMQ restarted under a create/destroy loop: 0 lost commands, 0 double effects, "
        "consumers back <= 30 s",
        infra.rabbitmq_restart,
        disruptive=True,
    ),
    Scenario(
        "ferretdb-restart",
        5,
        "FerretDB restarted under the same loop: the same",
        infra.ferretdb_restart,
        disruptive=True,
    ),
    Scenario(
        "dockerd-restart",
        1,
        "dockerd restarted R times with M machines: every machine back, same IP and host key; "
        "state matches <= 5 min",
        infra.dockerd_restart,
        disruptive=True,
    ),
    Scenario(
        "registry-down",
        3,
        "dc2's registry or imagesync killed during N pushes: the reconcile brings dc2 to 100%",
        images.registry_down,
    ),
    Scenario(
        "empty-db-gateway",
        1,
        "a gateway on an empty database joins the bus: no machine stopped or deleted",
        cluster.empty_database,
        unsupported=cluster.unsupported,
    ),
]
