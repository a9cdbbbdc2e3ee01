"""Pure logic of the gateway: API models, the machine lifecycle, placement."""

from .placement import (
    DcLoad,
    HostView,
    Ratios,
    Res,
    host_status,
    largest,
    place,
    place_all,
    place_prefix,
)
from .states import ACTIVE_STATES, CREATE_TERMINAL, TERMINAL_STATES, State, allowed_from, can_act

__all__ = [
    "ACTIVE_STATES",
    "CREATE_TERMINAL",
    "TERMINAL_STATES",
    "DcLoad",
    "HostView",
    "Ratios",
    "Res",
    "State",
    "allowed_from",
    "can_act",
    "host_status",
    "largest",
    "place",
    "place_all",
    "place_prefix",
]
