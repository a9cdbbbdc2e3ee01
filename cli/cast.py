"""Asciicast v2 (the format asciinema plays and the bastion records): parse a cast and replay it
at its real pace, or ``speed`` times faster.

The pace follows one clock: each frame is written when ``clock() - start`` reaches its time
divided by ``speed``, so the time spent writing never accumulates into drift. ``idle_limit``
caps every pause (as asciinema's ``-i``), for casts with long silences. The clock, the sleep and
the writer are parameters, so tests replay a real cast on a fake clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["Cast", "CastError", "Frame", "parse_cast", "play"]


class CastError(ValueError):
    """Not an asciicast v2 file."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One event: seconds since the start, its code (o output, i input, r resize), its data."""

    at: float
    code: str
    data: str


@dataclass(frozen=True, slots=True)
class Cast:
    """A parsed cast: its header, its frames, and whether its last line was cut short."""

    header: dict[str, Any]
    frames: list[Frame]
    truncated: bool = False

    @property
    def duration(self) -> float:
        """Seconds from the start to the last frame."""
        return self.frames[-1].at if self.frames else 0.0


def parse_cast(text: str) -> Cast:
    """Parse a cast; a last line cut short (a bastion killed mid-write) is dropped and noted."""
    lines = text.splitlines()
    if not lines:
        raise CastError("the recording is empty")
    try:
        header = json.loads(lines[0])
    except ValueError as err:
        raise CastError(f"the first line is not an asciicast header: {err}") from err
    if not isinstance(header, dict) or header.get("version") != 2:
        raise CastError("not an asciicast v2 recording (header version is not 2)")
    frames: list[Frame] = []
    truncated = False
    body = [line for line in lines[1:] if line.strip()]
    for n, line in enumerate(body):
        try:
            at, code, data = json.loads(line)
            frames.append(Frame(float(at), str(code), str(data)))
        except (ValueError, TypeError) as err:
            if n == len(body) - 1:
                truncated = True
                break
            raise CastError(f"line {n + 2} is not an event: {err}") from err
    return Cast(header, frames, truncated)


def play(
    frames: Iterable[Frame],
    write: Callable[[str], None],
    *,
    speed: float = 1.0,
    idle_limit: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> float:
    """Write each output frame at its time / ``speed`` (pauses capped at ``idle_limit``);
    return the replay's length on ``clock``."""
    if speed <= 0:
        raise ValueError("speed must be above 0")
    start = clock()
    due = 0.0  # when the current frame is due, in replay seconds since start
    previous = 0.0
    for frame in frames:
        pause = max(frame.at - previous, 0.0) / speed
        if idle_limit is not None:
            pause = min(pause, idle_limit)
        due += pause
        previous = frame.at
        wait = due - (clock() - start)
        if wait > 0:
            sleep(wait)
        if frame.code == "o":
            write(frame.data)
    return clock() - start
