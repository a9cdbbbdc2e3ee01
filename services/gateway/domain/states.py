"""The machine lifecycle: its states and which transitions each operation may take (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

__all__ = [
    "ACTIVE_STATES",
    "CREATE_TERMINAL",
    "LEGACY_UNREACHABLE",
    "TERMINAL_STATES",
    "UNREACHABLE_NAMES",
    "State",
    "can_act",
    "state_names",
]


class State(StrEnum):
    """Every state a machine can be in."""

    REQUESTED = "requested"
    IP_ASSIGNED = "ip_assigned"
    PLACED = "placed"
    CREATING = "creating"
    RUNNING = "running"
    STOPPED = "stopped"
    RESIZING = "resizing"
    DEPLOYING = "deploying"
    # Cold migration (services/gateway/service/migrate.py): stopped, its disk on its way.
    MIGRATING = "migrating"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    FAILED = "failed"
    # Its host stopped answering: kept (never destroyed) until the host is back.
    UNREACHABLE = "unreachable"

    @classmethod
    def _missing_(cls, value: object) -> State | None:
        """The state's name before issue 19 renamed it, as documents stored earlier hold it."""
        return cls.UNREACHABLE if value == LEGACY_UNREACHABLE else None


# ``unreachable`` was ``unknown``: documents stored before the rename still say so.
LEGACY_UNREACHABLE = "unknown"
UNREACHABLE_NAMES = frozenset({State.UNREACHABLE.value, LEGACY_UNREACHABLE})


# A machine in one of these states holds (or will hold) resources on a host and counts for its app.
ACTIVE_STATES = frozenset(
    {
        State.REQUESTED,
        State.IP_ASSIGNED,
        State.PLACED,
        State.CREATING,
        State.RUNNING,
        State.STOPPED,
        State.RESIZING,
        State.DEPLOYING,
        State.MIGRATING,
        State.UNREACHABLE,
    }
)
# States a create saga ends in; ``?wait`` returns once every machine is in one.
CREATE_TERMINAL = frozenset({State.RUNNING, State.STOPPED, State.FAILED, State.DESTROYED})
TERMINAL_STATES = frozenset({State.FAILED, State.DESTROYED})

# Which states each user action starts from.
_ALLOWED: dict[str, frozenset[State]] = {
    "start": frozenset({State.STOPPED, State.RUNNING, State.UNREACHABLE}),
    "stop": frozenset({State.RUNNING, State.STOPPED, State.UNREACHABLE}),
    "restart": frozenset({State.RUNNING, State.STOPPED, State.UNREACHABLE}),
    "resize": frozenset({State.RUNNING, State.STOPPED}),
    # Destroy may interrupt a create: the compensation of the create is the destroy itself.
    "destroy": frozenset(
        {
            State.REQUESTED,
            State.IP_ASSIGNED,
            State.PLACED,
            State.CREATING,
            State.RUNNING,
            State.STOPPED,
            State.RESIZING,
            State.UNREACHABLE,
            State.FAILED,
            State.DESTROYING,
        }
    ),
}


def can_act(action: str, state: str) -> bool:
    """Whether ``action`` may start from ``state``."""
    return State(state) in _ALLOWED[action]


def state_names(states: Iterable[State]) -> list[str]:
    """``states`` as the strings a store filter matches (with the old name of unreachable)."""
    names = {s.value for s in states}
    if State.UNREACHABLE.value in names:
        names.add(LEGACY_UNREACHABLE)
    return sorted(names)


def allowed_from(action: str) -> list[str]:
    """The states ``action`` may start from, as strings (for store filters)."""
    return state_names(_ALLOWED[action])
