"""The gateway service: the control plane (ops API, machine state, placement, sagas)."""

__all__: list[str] = []
