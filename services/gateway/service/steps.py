"""The step table: every (operation, step) of a machine saga, what it sends and how it times out.

The driver knows no operation by name: it looks the machine's current step up here to send its
command, to compute its deadline and to decide what a step that never answered leaves behind.
The built-in operations register their steps at start (``create``, ``lifecycle``); a new one (a
rolling deploy) registers its own the same way.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from libs.common.errors import ConflictError, DomainError

from ..documents import MachineDoc, SagaRecord

__all__ = [
    "Op",
    "SagaMatch",
    "Step",
    "StepSpec",
    "StepTable",
    "new_op_id",
    "saga_of",
    "timeout_reason",
]

# The filter that pins a saga at one step and attempt (a conditional update's ``match``).
SagaMatch = dict[str, Any]


class Op(StrEnum):
    """The built-in machine operations."""

    CREATE = "create"
    START = "start"
    STOP = "stop"
    RESTART = "restart"
    RESIZE = "resize"
    DESTROY = "destroy"
    # Undoes a failed create (partial container, then the IP); the machine stays failed.
    COMPENSATE = "compensate"


class Step(StrEnum):
    """The built-in steps; each sends one command to one peer."""

    IP = "ip"
    PLACE = "place"
    CONTAINER = "container"


@dataclass(frozen=True)
class StepSpec:
    """A registered step of an operation: the command it sends and how long to wait."""

    send: Callable[[MachineDoc], Awaitable[None]]
    timeout_s: float
    # What a step that never answered leaves behind: the machine's state and a reason.
    on_timeout_state: str | None = None
    # Or, for a step that needs more (a compensation, another step), what to do instead.
    on_exhausted: Callable[[MachineDoc, SagaMatch], Awaitable[None]] | None = None


class StepTable:
    """The registry of steps, by (operation, step)."""

    def __init__(self) -> None:
        self._specs: dict[tuple[str, str], StepSpec] = {}

    def register(self, op: str, step: str, spec: StepSpec) -> None:
        """Add (or replace) the step ``step`` of ``op``."""
        self._specs[(op, step)] = spec

    def get(self, op: str, step: str) -> StepSpec:
        """The spec of ``op``/``step``; a DomainError when no operation registered it."""
        spec = self._specs.get((op, step))
        if spec is None:
            raise DomainError(f"no step {op}/{step} is registered", reason="unknown_step")
        return spec

    def find(self, op: str, step: str) -> StepSpec | None:
        """The spec of ``op``/``step``, or None (a saga left by an operation no longer known)."""
        return self._specs.get((op, step))


def new_op_id() -> str:
    """A fresh operation id (what the API's ``wait_op`` waits for)."""
    return secrets.token_hex(6)


def saga_of(doc: MachineDoc) -> SagaRecord:
    """The machine's saga; a ConflictError if another writer ended it in the meantime."""
    saga = doc["saga"]
    if saga is None:
        raise ConflictError(f"{doc['_id']} has no operation in progress", reason="saga_ended")
    return saga


def timeout_reason(saga: SagaRecord) -> str:
    """The reason a machine records when ``saga``'s step never answered."""
    return f"timeout: no answer to {saga['op']}/{saga['step']}"
