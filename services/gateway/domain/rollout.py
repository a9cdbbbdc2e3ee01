"""Rolling releases, the pure part: batches, and when a batch stops the release."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from enum import StrEnum

__all__ = ["MachineStatus", "ReleaseStatus", "Verdict", "batch_verdict", "plan_batches"]


class ReleaseStatus(StrEnum):
    """Where a release is."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class MachineStatus(StrEnum):
    """Where one machine of a release is."""

    PENDING = "pending"
    DEPLOYING = "deploying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Verdict(StrEnum):
    """What a release does once it looked at its current batch."""

    WAIT = "wait"
    STOP = "stop"
    NEXT = "next"


DONE = frozenset({MachineStatus.SUCCEEDED, MachineStatus.FAILED})


def plan_batches(
    machine_ids: Sequence[str], batch_size: int | None, batch_percent: int | None
) -> list[list[str]]:
    """Split the machines, in order, into batches of ``batch_size`` or ``batch_percent`` %."""
    if not machine_ids:
        return []
    if batch_size is None:
        if batch_percent is None:
            raise ValueError("give batch_size or batch_percent")
        batch_size = max(1, math.ceil(len(machine_ids) * batch_percent / 100))
    return [list(machine_ids[i : i + batch_size]) for i in range(0, len(machine_ids), batch_size)]


def batch_verdict(
    batch: Sequence[str], statuses: Mapping[str, str], failed_so_far: int, max_failures: int
) -> Verdict:
    """``wait`` while a machine of ``batch`` is unfinished, else ``stop`` past max_failures,
    else ``next``. ``failed_so_far`` counts failures of earlier batches."""
    if any(statuses.get(m) not in DONE for m in batch):
        return Verdict.WAIT
    failed = failed_so_far + sum(statuses[m] == MachineStatus.FAILED for m in batch)
    return Verdict.STOP if failed > max_failures else Verdict.NEXT
