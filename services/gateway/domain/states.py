"""The machine lifecycle: its states and which transitions each operation may take (pure)."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ACTIVE_STATES",
    "CREATE_TERMINAL",
    "TERMINAL_STATES",
    "State",
    "can_act",
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
    UNKNOWN = "unknown"


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
        State.UNKNOWN,
    }
)
# States a create saga ends in; ``?wait`` returns once every machine is in one.
CREATE_TERMINAL = frozenset({State.RUNNING, State.STOPPED, State.FAILED, State.DESTROYED})
TERMINAL_STATES = frozenset({State.FAILED, State.DESTROYED})

# Which states each user action starts from.
_ALLOWED: dict[str, frozenset[State]] = {
    "start": frozenset({State.STOPPED, State.RUNNING, State.UNKNOWN}),
    "stop": frozenset({State.RUNNING, State.STOPPED, State.UNKNOWN}),
    "restart": frozenset({State.RUNNING, State.STOPPED, State.UNKNOWN}),
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
            State.UNKNOWN,
            State.FAILED,
            State.DESTROYING,
        }
    ),
}


def can_act(action: str, state: str) -> bool:
    """Whether ``action`` may start from ``state``."""
    return State(state) in _ALLOWED[action]


def allowed_from(action: str) -> list[str]:
    """The states ``action`` may start from, as strings (for store filters)."""
    return sorted(s.value for s in _ALLOWED[action])
