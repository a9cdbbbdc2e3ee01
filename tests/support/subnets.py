"""A /24 for a test's Docker network that no network on the engine overlaps.

Tests pick their machine networks at random in 10.234.0.0/16; a network another run left
behind (a phantom endpoint can keep Docker from removing one, moby#17217) or made meanwhile
would make Docker refuse the test's pool ("Pool overlaps"), and its create fail.
"""

from __future__ import annotations

import ipaddress
import random

import docker

__all__ = ["free_24"]


def free_24(lo: int = 0, hi: int = 255, second: int = 234) -> int:
    """A third octet ``n`` in [lo, hi] such that 10.<second>.n.0/24 overlaps no Docker network."""
    client = docker.from_env()
    try:
        taken = [
            ipaddress.ip_network(cfg["Subnet"], strict=False)
            for net in client.api.networks()
            for cfg in ((net.get("IPAM") or {}).get("Config") or [])
            if cfg.get("Subnet") and ":" not in cfg["Subnet"]
        ]
    finally:
        client.close()
    free = [
        n
        for n in range(lo, hi + 1)
        if not any(ipaddress.ip_network(f"10.{second}.{n}.0/24").overlaps(t) for t in taken)
    ]
    if not free:
        raise RuntimeError(f"no free /24 in 10.{second}.{lo}-{hi}.0")
    return random.choice(free)
