"""Sizes as ops write them (``512m``, ``4g``, ``10G``) and back. Units are binary (m = MiB)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = ["ByteSize", "format_bytes", "parse_bytes"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE | re.ASCII)


def parse_bytes(value: str | int) -> int:
    """Parse ``512m``/``4g``/``1.5G``/``4GiB`` or a plain integer of bytes; reject the rest."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number with an optional unit (k, m, g, t)")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("a size must be positive")
        return value
    m = _RE.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a size: use a number with k, m, g or t, e.g. 512m")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ValueError("a size must be positive")
    return n


def format_bytes(n: int) -> str:
    """Render bytes in the largest whole-ish binary unit (``4g``, ``512m``)."""
    for suffix, size in (("t", 1 << 40), ("g", 1 << 30), ("m", 1 << 20), ("k", 1 << 10)):
        if n >= size and n % (size // 1024 or 1) == 0:
            value = n / size
            return f"{value:g}{suffix}"
    return str(n)


# What an input may be, as a JSON schema (_RE without its flags): the API's document says it.
_INPUT_SCHEMA = {
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*[kKmMgGtT]?([iI]?[bB])?\s*$"},
    ]
}
ByteSize = Annotated[
    int,
    BeforeValidator(parse_bytes),
    PlainSerializer(int, return_type=int),
    WithJsonSchema(_INPUT_SCHEMA, mode="validation"),
]
"""A size in bytes that accepts ``512m``-style strings on input."""
