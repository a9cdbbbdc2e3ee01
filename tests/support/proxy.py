"""A TCP proxy in front of RabbitMQ that can drop connections the way a network does.

:meth:`TcpProxy.cut` closes the client side of every proxied connection and leaves the
broker side open and silent: the client sees its connection die and reconnects at once, while
the broker keeps the old connection (and what it holds, such as exclusive queues) until its
heartbeat gives up on it. That is the reconnect a robust client must survive.
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream_host:upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()
        self._clients: list[asyncio.StreamWriter] = []
        self._brokers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> TcpProxy:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._clients.append(writer)
        self._brokers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pump(src, dst))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def cut(self) -> None:
        """Drop every client connection now; the broker is told nothing."""
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for writer in self._clients:
            writer.transport.abort()
        self._clients.clear()

    async def close(self) -> None:
        """Stop listening and close both sides of everything still open."""
        if self._server is not None:
            self._server.close()
        await self.cut()
        for writer in self._brokers:
            writer.transport.abort()
        self._brokers.clear()


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    # One side ended on its own (a clean close): pass it on.
    dst.transport.abort()
