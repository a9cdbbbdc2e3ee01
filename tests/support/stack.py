"""Per-test isolation on the real local stack: a uuid vhost on RabbitMQ, a uuid database."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp

AMQP_HOST = os.environ.get("DOCKVM_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("DOCKVM_TEST_AMQP_PORT", "5672"))
RABBIT_API = os.environ.get("DOCKVM_TEST_RABBIT_API", "http://127.0.0.1:15672/api")
RABBIT_HEADERS = {"Authorization": aiohttp.encode_basic_auth("guest", "guest")}
MONGO_URL = os.environ.get("DOCKVM_MONGO_URL", "mongodb://127.0.0.1:27017/")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Vhost:
    """A throwaway RabbitMQ virtual host."""

    name: str

    @property
    def url(self) -> str:
        """The AMQP URL of this vhost."""
        return self.url_via(AMQP_HOST, AMQP_PORT)

    def url_via(self, host: str, port: int) -> str:
        """The AMQP URL of this vhost through ``host:port`` (a proxy in front of RabbitMQ)."""
        return f"amqp://guest:guest@{host}:{port}/{quote(self.name, safe='')}"

    async def queue(self, name: str) -> dict:
        """The management API's view of one queue (messages, arguments...)."""
        async with aiohttp.ClientSession(headers=RABBIT_HEADERS) as s:
            url = f"{RABBIT_API}/queues/{quote(self.name, safe='')}/{quote(name, safe='')}"
            async with s.get(url) as r:
                r.raise_for_status()
                return await r.json()

    async def close_connections(self, timeout: float = 30.0) -> int:
        """Have RabbitMQ close every client connection of this vhost; return how many.

        The management API lists a connection only once its statistics are emitted, so this
        waits (up to ``timeout``) for at least one to show.
        """
        async with aiohttp.ClientSession(headers=RABBIT_HEADERS) as s, asyncio.timeout(timeout):
            url = f"{RABBIT_API}/vhosts/{quote(self.name, safe='')}/connections"
            while True:
                async with s.get(url) as r:
                    r.raise_for_status()
                    names = [c["name"] for c in await r.json()]
                if names:
                    break
                await asyncio.sleep(0.2)
            for name in names:
                headers = {"X-Reason": "closed by a test"}
                url = f"{RABBIT_API}/connections/{quote(name, safe='')}"
                async with s.delete(url, headers=headers) as r:
                    if r.status not in (204, 404):
                        r.raise_for_status()
        return len(names)


async def create_vhost() -> Vhost:
    """Create a uuid-named vhost with full permissions for guest."""
    vhost = Vhost(f"test-{uuid.uuid4().hex[:12]}")
    q = quote(vhost.name, safe="")
    async with aiohttp.ClientSession(headers=RABBIT_HEADERS) as s:
        async with s.put(f"{RABBIT_API}/vhosts/{q}") as r:
            r.raise_for_status()
        perms = {"configure": ".*", "write": ".*", "read": ".*"}
        async with s.put(f"{RABBIT_API}/permissions/{q}/guest", json=perms) as r:
            r.raise_for_status()
    return vhost


async def delete_vhost(vhost: Vhost) -> None:
    """Delete the vhost and everything in it."""
    async with aiohttp.ClientSession(headers=RABBIT_HEADERS) as s:
        async with s.delete(f"{RABBIT_API}/vhosts/{quote(vhost.name, safe='')}") as r:
            if r.status not in (204, 404):
                r.raise_for_status()
