"""Messages of the monitor service: the commands it accepts and the events it emits."""

from __future__ import annotations

__all__: list[str] = []
